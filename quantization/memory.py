"""Memory per precision: parameter bytes at FP32/BF16/FP16/INT8/INT4, the measured footprint, and what fits a GPU.

The book's claim: FP16 halves FP32, INT8 quarters it, INT4 cuts it by 87.5%. That is the naive count (every weight
at the precision). Real weight-only checkpoints keep embeddings, LM head and norms in 16 bit and pay for scales:
INT8 one 16-bit scale per output channel, INT4 a 16-bit scale and a 4-bit zero point per group. Both counts are
printed, then the footprint measured by quantizing the loaded model with this chapter's modules (small models).

    python -m quantization.memory                                 # default model, measured too
    python -m quantization.memory --model llama2-70b --gpu-memory-gb 80
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.config import ModelConfig
from core.errors import cli
from core.registry import REGISTRY

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}


def linear_params(cfg: ModelConfig) -> int:
    """Weights of the decoder layers' projections: what weight-only quantization compresses."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)


def linear_rows(cfg: ModelConfig) -> int:
    """Output channels summed over all projections (one INT8 scale each)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (q + 2 * kv + cfg.hidden_size + 2 * cfg.intermediate_size + cfg.hidden_size)


def naive_bytes(cfg: ModelConfig, precision: str) -> float:
    """Every parameter at the precision: the book's arithmetic."""
    return cfg.num_params() * BITS[precision] / 8


def checkpoint_bytes(cfg: ModelConfig, precision: str, group_size: int = 128) -> float:
    """Weight-only quantization as shipped: projections quantized, the rest in 16 bit, plus scales and zeros."""
    total, lin = cfg.num_params(), linear_params(cfg)
    if precision in ("fp32", "bf16", "fp16"):
        return total * BITS[precision] / 8
    rest = (total - lin) * 2
    if precision == "int8":
        return rest + lin + linear_rows(cfg) * 2
    return rest + lin / 2 + lin / group_size * (2 + 0.5)


def max_params_b(gpu_memory_gb: float, utilization: float, bytes_per_param: float) -> float:
    """Largest parameter count (billions) whose weights fit the usable share of the GPU (the rest: KV cache...)."""
    return gpu_memory_gb * 1e9 * utilization / bytes_per_param / 1e9


def measure_footprints(name: str, random_weights: bool, group_size: int) -> dict[str, float]:
    """Load the model at each precision, quantize with our modules, count bytes of every tensor it holds."""
    from core.loading import load_model
    from quantization.linear import quantize_model, weight_bytes

    out = {}
    for precision in PRECISIONS:
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(precision, torch.bfloat16)
        model = load_model(name, "cpu", dtype, random_weights).model
        if precision in ("int8", "int4"):
            quantize_model(model, precision, group_size)
        out[precision] = weight_bytes(model)
        del model
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--group-size", type=int, default=0, help="INT4 group size (0: 128, or 64 where 128 "
                        "does not divide the hidden size, as for SmolLM2)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory for the 'largest model' table")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of GPU memory for weights (vLLM's name; the rest is for KV cache, activations)")
    parser.add_argument("--measure", choices=("auto", "yes", "no"), default="auto",
                        help="load and quantize the model to measure its footprint (auto: models under 2B params)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from core.loading import find_model_dir

    spec = REGISTRY.get(args.model)
    if spec is not None:
        cfg = spec.config
    else:
        cfg = ModelConfig.from_hf(json.loads((find_model_dir(args.model) / "config.json").read_text()))
    gs = args.group_size or (128 if all(k % 128 == 0 for k in (cfg.hidden_size, cfg.intermediate_size)) else 64)
    measure = args.measure == "yes" or (args.measure == "auto" and cfg.num_params() < 2e9)
    measured = measure_footprints(args.model, args.random_weights, gs) if measure else {}
    random = args.random_weights or (spec is not None and spec.random_only)

    fp32 = naive_bytes(cfg, "fp32")
    print(f"\n{args.model} ({'RANDOM weights' if random else 'trained weights'}): {cfg.num_params() / 1e9:.3f} B "
          f"parameters, {linear_params(cfg) / cfg.num_params():.0%} of them in decoder-layer projections; "
          f"INT4 group size {gs}")
    head = f"{'precision':<10}{'all weights':>14}{'vs FP32':>9}{'as shipped*':>14}{'vs FP32':>9}{'measured':>14}"
    print(head)
    print("-" * len(head))
    rows = []
    for p in PRECISIONS:
        naive, shipped = naive_bytes(cfg, p), checkpoint_bytes(cfg, p, gs)
        m = measured.get(p)
        rows.append({"precision": p, "naive_bytes": naive, "checkpoint_bytes": shipped, "measured_bytes": m})
        print(f"{p:<10}{naive / 1e9:>11.3f} GB{naive / fp32:>9.1%}{shipped / 1e9:>11.3f} GB{shipped / fp32:>9.1%}"
              f"{(f'{m / 1e9:.3f} GB') if m else 'not loaded':>14}")
    print("* projections quantized, embeddings/LM head/norms in 16 bit, plus scales (INT8: one per row; "
          f"INT4: 16-bit scale + 4-bit zero per {gs} weights)")

    fits = []
    print(f"\nLargest model whose weights fit {args.gpu_memory_gb:g} GB at {args.gpu_memory_utilization:.0%} "
          "(naive bytes per parameter):")
    for p in ("fp32", "fp16", "int8", "int4"):
        billions = max_params_b(args.gpu_memory_gb, args.gpu_memory_utilization, BITS[p] / 8)
        ok = [s.name for s in REGISTRY.values() if s.config.num_params() * BITS[p] / 8 <= billions * 1e9 * (1 + 1e-9)
              and s.config.num_params() > 1e9]
        fits.append({"precision": p, "max_params_b": billions, "registered_models_that_fit": ok})
        print(f"  {p:<6}{billions:>7.1f} B parameters   fits: {', '.join(ok) or '-'}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "random_weights": random, "group_size": gs,
                                        "rows": rows, "gpu_memory_gb": args.gpu_memory_gb, "fits": fits}, indent=2))


if __name__ == "__main__":
    main()
