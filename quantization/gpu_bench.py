"""Batch-1 decode speed of BF16, INT8 and INT4 weights on a GPU, against the copy bandwidth (the floor).

Decoding one token at batch 1 reads every weight once, so ms/token ~ weight bytes / bandwidth: INT8 should approach
half of BF16's time and INT4 a quarter, if the kernel reads packed weights directly. Each config is
precision[:backend][:compile]: backend "torch" is PyTorch's weight-only kernels (tinygemm for INT4,
_weight_int8pack_mm for INT8), "triton" our matrix-vector kernels (triton_gemv.py), "dequant" unpacks to BF16 before a
normal matmul; "compile" runs the decode step through torch.compile (which fuses the small elementwise kernels of
norms, RoPE and SwiGLU, and can fuse an INT8 dequant into the matmul); "fused" stacks q|k|v and gate|up into one
projection each, as a serving engine does (our engine's engines/ours/fused_projections.py): five matrix-vector
products per layer become two, larger ones, and each kernel launch has a fixed cost. `--int4-head` also makes the LM
head and the embedding INT4 (group 32, quantization.linear.quantize_embeddings); checkpoint formats keep them in 16
bits. "factored" (INT4, triton) multiplies up to 16 rows, one included, with triton_gemm.py's factored kernel. "pdl"
launches our matrix-vector kernels and torch.compile's with programmatic dependent launch (Hopper and later): each
kernel may start while the one before it finishes, and ours load their first weights before they wait for it; "op"
launches ours the same way (custom ops, tuned by Triton's autotuner, not torch.compile's) without PDL. "half2" (INT4,
triton) uses triton_gemv_half2.py's f16x2 kernel for the one-row products.
Random weights of the model's shape.

    python -m quantization.gpu_bench --model llama2-7b                 # on an H100: a few minutes
    python -m quantization.gpu_bench --configs bf16,int4:torch --max-tokens 64
    python -m quantization.gpu_bench --model llama2-70b --configs int4:torch    # 70B INT4 on one 80 GB GPU
    python -m quantization.gpu_bench --configs int4:torch:compile:fused,int4:triton:compile:fused --int4-head
    python -m quantization.gpu_bench --configs int4:triton:compile:fused,int4:triton:compile:fused:pdl --int4-head
    python -m quantization.gpu_bench --model tiny --device cpu --configs bf16,int4:torch   # code path check only
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.bench_decode import copy_bandwidth_gbs, sync
from core.errors import UserError, cli
from core.generate import SamplingParams, generate
from core.loading import LoadedModel, load_model, resolve_device
from core.measure import gpu_peak_mb, worst_error
from core.model import DecoderLayer, Transformer
from core.registry import REGISTRY
from quantization.linear import (LAYER_LINEARS, Int4Linear, pick_group_size, quantize_embeddings, quantize_linear,
                                 set_backend, set_module, weight_bytes)

MAX_KERNEL_ERROR = 2e-2  # bfloat16 rounding stays well below; any layout bug is far above
DEFAULT_CONFIGS = ("bf16,bf16:compile,int8:dequant,int8:torch,int8:triton,int8:triton:compile,int4:dequant,int4:torch,"
                   "int4:torch:compile,int4:triton,int4:triton:compile")


def build(model_name: str, device: str, precision: str, backend: str, group_size: int, fused: bool = False,
          int4_head: bool = False) -> tuple[LoadedModel, float]:
    """Random weights of the model's shape, BF16 or quantized with our modules.

    Quantized models are built one decoder layer at a time (random BF16 layer on the device, quantize, next), so the
    peak is the quantized model plus one BF16 layer: Llama-2-70B runs at INT4 (about 37 GB) on one 80 GB GPU although
    its BF16 weights (138 GB) never fit. Returns the model and the largest `kernel_error` of layer 0's projections.
    """
    if precision == "bf16":
        return finish(load_model(model_name, device, "bfloat16", random_weights=True), fused), 0.0
    spec = REGISTRY.get(model_name)
    if spec is None:
        raise UserError(f"gpu_bench takes a registered model name ({', '.join(REGISTRY)}), got {model_name!r}")
    dev = torch.device(device)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = Transformer(spec.config)
    finally:
        torch.set_default_dtype(previous)
    gs = pick_group_size(model, group_size)
    errors = []
    modules = [*model.layers, model.embed_tokens, model.norm, model.lm_head]
    for module in tqdm(modules, desc=f"{model_name} {precision} random weights", unit="module", mininterval=10):
        module.to_empty(device=dev)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
        if not isinstance(module, DecoderLayer):
            continue
        for name in LAYER_LINEARS:
            q = quantize_linear(module.get_submodule(name), precision, gs)
            q.backend = backend
            if module is model.layers[0]:
                errors.append(kernel_error(q))
            if precision == "int4" and backend == "torch" and not fused:
                q.use_kernel_only()  # the kernel's layout replaces ours: weight bytes counted once
            set_module(module, name, q)
    if spec.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if int4_head:
        quantize_embeddings(model)
        set_backend(model, backend)
    lm = finish(LoadedModel(model.eval(), model_name, True, None), fused)
    if precision == "int4" and backend == "torch" and fused:  # tinygemm's layout of the stacked weights
        for m in lm.model.layers.modules():  # (an INT4 head keeps ours too: the embedding gathers its rows)
            if isinstance(m, Int4Linear) and m.qweight.numel():
                m.use_kernel_only()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return lm, worst_error(errors)


def finish(lm: LoadedModel, fused: bool) -> LoadedModel:
    """With `fused`, the model to time is a serving copy with q|k|v and gate|up stacked (our engine's); the separate
    modules become views of the stacked weights, so nothing is held twice."""
    if not fused:
        return lm
    from engines.ours.fused_projections import fuse_projections  # the engine's, so both time the same model
    return dataclasses.replace(lm, model=fuse_projections(lm.model))


@torch.no_grad()
def kernel_error(q: torch.nn.Module) -> float:
    """Relative error of a quantized module's output against x @ W_dequantized^T in float32, the worse of a random x
    of 1 row (the decode's kernel) and of 4 (the prompt's); NaN if either output has one.

    The check GPU runs make without pytest: a wrong packing or layout gives errors near 1, bfloat16 arithmetic ~1e-2.
    """
    w = q.dequantized_weight()
    errors = []
    for rows in (1, 4):
        x = torch.randn(rows, q.in_features, device=w.device, dtype=torch.bfloat16)
        ref = x.float() @ w.float().T + (0 if q.bias is None else q.bias.float())
        errors.append((q(x).float() - ref).norm() / ref.norm())
    return worst_error(errors)


def decode_ms(lm, prompt_len: int, max_tokens: int, repeats: int, cuda_graph: bool,
              compile: bool) -> tuple[float, list[int]]:
    """Median over repeats of the median time per decode step, in ms, and the tokens of the last repeat."""
    device = next(lm.model.parameters()).device
    vocab = min(lm.model.config.vocab_size, 32000)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    # The warm-up takes as many tokens as the timed runs: the KV cache is sized prompt + max_tokens, and
    # torch.compile (static shapes) compiles again for every other size (a 70B run once spent ~3 minutes on that).
    generate(lm.model, [prompt], params, cuda_graph=cuda_graph, compile=compile)  # warm-up (and compilation)
    progress(f"warm-up{' and torch.compile' if compile else ''}{' and CUDA graph' if cuda_graph else ''}", t0)
    per_token = []
    for i in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = generate(lm.model, [prompt], params, cuda_graph=cuda_graph, compile=compile)
        per_token.append(statistics.median(result.token_times_s))
        progress(f"timed run {i + 1}", t0)
    return statistics.median(per_token) * 1e3, result.tokens[0]


def progress(what: str, since: float) -> None:
    """One line per stage, so that a run cut by a time limit still says where its time went (the 70B's build and
    compilation take minutes)."""
    print(f"  {what} in {time.perf_counter() - since:.0f} s", flush=True)


def use_pdl(on: bool, as_op: bool) -> None:
    """Programmatic dependent launch (Hopper and later) for our matrix-vector kernels and torch.compile's kernels, so
    that each kernel of a decode step starts while the one before it finishes (its weights need not wait); as_op:
    our kernels as custom ops (as PDL needs them), with or without it."""
    from quantization import triton_gemv
    triton_gemv.use_pdl(on, as_op)
    import torch._inductor.config as inductor
    if hasattr(inductor.triton, "enable_pdl"):
        inductor.triton.enable_pdl = on


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--group-size", type=int, default=0, help="INT4 group size (0: 128 where it divides "
                        "every input size, as for Llama shapes; else 64 or 32)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cuda-graph", action="store_true", help="launch every kernel from Python instead")
    parser.add_argument("--int4-head", action="store_true", help="INT4 LM head and embedding (group 32) in the "
                        "quantized configs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)  # a CPU run only checks the code path (tests); the numbers are for GPUs
    cuda_graph = device.type == "cuda" and not args.no_cuda_graph
    bandwidth = copy_bandwidth_gbs(device, (2 << 30) if device.type == "cuda" else (256 << 20))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for config in args.configs.split(","):
        parts = config.split(":")
        precision, compile, fused = parts[0], "compile" in parts, "fused" in parts
        backend = next((p for p in parts[1:] if p not in ("compile", "fused", "factored", "pdl", "op", "half2")),
                       "dequant")
        if device.type == "cuda":  # INT4 "triton" up to 16 rows: the factored GEMM, or the matrix-vector kernel
            from quantization import triton_gemm
            triton_gemm.FACTORED_MAX_ROWS = 16 if "factored" in parts else 0
            use_pdl("pdl" in parts, "pdl" in parts or "op" in parts)
            from quantization import triton_gemv_half2
            triton_gemv_half2.ENABLED = "half2" in parts
        if precision not in ("bf16", "int8", "int4"):
            raise UserError(f"unknown precision in {config!r} (bf16, int8, int4)")
        t0 = time.perf_counter()
        lm, err = build(args.model, str(device), precision, backend, args.group_size, fused,
                        args.int4_head and precision != "bf16")
        progress(f"{config}: built", t0)
        nbytes = weight_bytes(lm.model)
        row = {"config": config, "model": lm.label, "weight_gb": nbytes / 1e9, "kernel_rel_error": err}
        try:
            if not err <= MAX_KERNEL_ERROR:  # (NaN too)
                raise RuntimeError(f"WRONG RESULT: relative error {err:.3f} against the dequantized weights")
            ms, tokens = decode_ms(lm, args.prompt_len, args.max_tokens, args.repeats, cuda_graph, compile)
            row.update(tokens=tokens, tpot_ms=ms, floor_ms=nbytes / (bandwidth * 1e9) * 1e3,
                       fraction_of_copy_bandwidth=nbytes / (ms / 1e3) / (bandwidth * 1e9))
        except Exception as e:  # a kernel missing in this torch build, a compiler failure: say so, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        row["peak_gpu_mb"] = gpu_peak_mb(device)
        row["wall_s"] = time.perf_counter() - t0
        if backend == "triton" and device.type == "cuda":  # cumulative over this run's configs
            from quantization import triton_gemv, triton_gemv_half2
            row["matvec_tuned_configs"] = {**triton_gemv.tuned_configs(), **triton_gemv_half2.tuned_configs()}
        rows.append(row)
        if args.out:  # after every row: a run cut short still leaves what it measured
            args.out.write_text(json.dumps({"device": device_name, "copy_bandwidth_gbs": bandwidth,
                                            "torch": torch.__version__, "rows": rows}, indent=2))
        print(f"  {config:<28} " + (f"{row['tpot_ms']:.2f} ms/token, {row['fraction_of_copy_bandwidth']:.0%} of "
              f"copy bandwidth" if "tpot_ms" in row else row["error"]), flush=True)
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    print(f"\n{rows[0]['model'].split(' [')[0]} [RANDOM weights], batch 1, prompt {args.prompt_len}, "
          f"{args.max_tokens} tokens, {device_name}, copy bandwidth {bandwidth:.0f} GB/s, "
          f"CUDA graphs {'on' if cuda_graph else 'off'}, torch {torch.__version__}")
    head = (f"{'config':<28}{'weights GB':>11}{'ms/token':>10}{'floor ms':>10}{'of copy BW':>12}{'peak GPU MB':>13}"
            f"{'kernel err':>12}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        if "tpot_ms" in r:
            print(f"{r['config']:<28}{r['weight_gb']:>11.2f}{r['tpot_ms']:>10.2f}{r['floor_ms']:>10.2f}"
                  f"{r['fraction_of_copy_bandwidth']:>12.0%}{r['peak_gpu_mb']:>13.0f}{r['kernel_rel_error']:>12.1e}")
        else:
            print(f"{r['config']:<28}{r['weight_gb']:>11.2f}  {r['error']}")
    # The same weights (seeded) through the same kernels and tuned configs, launched with or without PDL, must give
    # the same greedy tokens. ("op" is that pair; without it torch.compile tunes and launches our kernels its own
    # way, and a different split-K sums in another order: random weights' near-tied logits then part within tokens.)
    by_config = {r["config"]: r for r in rows if "tokens" in r}
    for r in by_config.values():
        if "pdl" in r["config"].split(":") and (plain := by_config.get(r["config"].replace(":pdl", ":op"))
                                                 or by_config.get(r["config"].replace(":pdl", ""))):
            same = r["tokens"] == plain["tokens"]
            r["tokens_match_" + plain["config"]] = same
            print(f"{r['config']}: tokens {'identical to' if same else 'DIFFER from'} {plain['config']}'s")
    if args.out:
        args.out.write_text(json.dumps({"device": device_name, "copy_bandwidth_gbs": bandwidth,
                                        "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
