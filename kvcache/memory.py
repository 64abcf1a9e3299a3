"""KV-cache memory: bytes per token and per sequence, and the batch x context that fits a GPU.

Every token keeps one key and one value vector per layer and per KV head:
    kv_bytes_per_token = 2 (K and V) x layers x kv_heads x head_dim x bytes_per_value
Grouped-query attention (fewer KV heads than query heads) and a narrower cache dtype are the two levers; the
formula is checked against the measured size of our caches (`--check`).

    python -m kvcache.memory                                  # every registered model, bf16 cache, 80 GB GPU
    python -m kvcache.memory --kv-cache-dtype fp8 --max-model-len 32768 --gpu-memory-gb 80
    python -m kvcache.memory --check                          # formula vs measured cache sizes (default model)
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from core.config import ModelConfig
from core.errors import UserError, cli
from core.registry import REGISTRY

# Bytes per stored value. "int8"/"int4" are our quantized cache (kvcache.policies.quantized): they add one float16
# scale per token, head and K/V, which `bytes_per_value` spreads over the head dimension.
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
SCALE_BYTES = {"int8": 2, "int4": 2}


def bytes_per_value(kv_cache_dtype: str, head_dim: int) -> float:
    """Average bytes per cached number, scales of quantized formats included."""
    if kv_cache_dtype not in DTYPE_BYTES:
        raise UserError(f"unknown kv_cache_dtype {kv_cache_dtype!r} (choose from {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[kv_cache_dtype] + SCALE_BYTES.get(kv_cache_dtype, 0) / head_dim


def kv_bytes_per_token(cfg: ModelConfig, kv_cache_dtype: str = "bfloat16") -> float:
    """Keys and values of one token across all layers, in bytes."""
    return cfg.kv_bytes_per_token(bytes_per_value(kv_cache_dtype, cfg.head_dim))


def kv_bytes_per_sequence(cfg: ModelConfig, context_len: int, kv_cache_dtype: str = "bfloat16") -> float:
    """Bytes of one sequence's cache holding `context_len` tokens."""
    return context_len * kv_bytes_per_token(cfg, kv_cache_dtype)


def weight_bytes(cfg: ModelConfig, weight_dtype: str = "bfloat16") -> float:
    return cfg.num_params() * DTYPE_BYTES[weight_dtype]


def kv_budget_bytes(cfg: ModelConfig, gpu_memory_gb: float, gpu_memory_utilization: float = 0.9,
                    weight_dtype: str = "bfloat16") -> float:
    """What is left for the KV cache: the share of the GPU vLLM may use, minus the weights (activations ignored)."""
    return gpu_memory_gb * 2**30 * gpu_memory_utilization - weight_bytes(cfg, weight_dtype)


def max_batch_size(cfg: ModelConfig, context_len: int, gpu_memory_gb: float, kv_cache_dtype: str = "bfloat16",
                   gpu_memory_utilization: float = 0.9, weight_dtype: str = "bfloat16") -> int:
    """How many sequences of `context_len` tokens fit next to the weights (0 if not even one)."""
    free = kv_budget_bytes(cfg, gpu_memory_gb, gpu_memory_utilization, weight_dtype)
    return max(0, math.floor(free / kv_bytes_per_sequence(cfg, context_len, kv_cache_dtype)))


def max_tokens_in_cache(cfg: ModelConfig, gpu_memory_gb: float, kv_cache_dtype: str = "bfloat16",
                        gpu_memory_utilization: float = 0.9, weight_dtype: str = "bfloat16") -> int:
    """Total tokens the cache holds (batch x context), the number vLLM logs as 'GPU KV cache size'."""
    free = kv_budget_bytes(cfg, gpu_memory_gb, gpu_memory_utilization, weight_dtype)
    return max(0, math.floor(free / kv_bytes_per_token(cfg, kv_cache_dtype)))


def measured_check(num_tokens: int = 1000) -> list[dict]:
    """Fill our caches with `num_tokens` tokens of the default model and compare their nbytes with the formula."""
    from core.kv_cache import StaticKVCache
    from core.loading import load_model
    from kvcache.policies import make_cache

    lm = load_model("smollm2-135m", "cpu", "float32")
    cfg = lm.model.config
    ids = torch.randint(0, cfg.vocab_size, (1, num_tokens))
    rows = []
    caches = [("StaticKVCache", "float32", StaticKVCache.for_model(lm.model, 1, num_tokens)),
              ("full", "float32", make_cache("full", lm.model)),
              ("int8", "int8", make_cache("int8", lm.model, max_len=num_tokens)),
              ("int4", "int4", make_cache("int4", lm.model, max_len=num_tokens))]
    for name, dtype, cache in caches:
        with torch.inference_mode():
            lm.model(ids, cache=cache, last_only=True)
        predicted = kv_bytes_per_sequence(cfg, num_tokens, dtype)
        rows.append({"cache": name, "kv_cache_dtype": dtype, "tokens": num_tokens, "predicted_bytes": predicted,
                     "measured_bytes": cache.nbytes(), "match": cache.nbytes() == predicted})
    return rows


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="registered model (repeatable); default: all")
    parser.add_argument("--kv-cache-dtype", default="bfloat16", help=", ".join(DTYPE_BYTES))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (the weights share the GPU with the cache)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="context length per sequence (tokens)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory in GiB (H100: 80)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--check", action="store_true", help="compare the formula with measured cache sizes")
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args(argv)
    if args.max_model_len < 1:
        raise UserError("--max-model-len must be at least 1")
    names = args.model or list(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r} (choose from {', '.join(REGISTRY)})")

    rows = []
    for name in names:
        cfg = REGISTRY[name].config
        per_tok = kv_bytes_per_token(cfg, args.kv_cache_dtype)
        rows.append({"model": name, "layers": cfg.num_layers, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                     "kv_cache_dtype": args.kv_cache_dtype, "kv_bytes_per_token": per_tok,
                     "kv_bytes_per_sequence": per_tok * args.max_model_len,
                     "weight_bytes": weight_bytes(cfg, args.dtype),
                     "max_batch_size": max_batch_size(cfg, args.max_model_len, args.gpu_memory_gb,
                                                      args.kv_cache_dtype, args.gpu_memory_utilization, args.dtype),
                     "max_tokens_in_cache": max_tokens_in_cache(cfg, args.gpu_memory_gb, args.kv_cache_dtype,
                                                                args.gpu_memory_utilization, args.dtype)})
    print(f"KV cache ({args.kv_cache_dtype}) per model; weights {args.dtype}; context {args.max_model_len} tokens; "
          f"GPU {args.gpu_memory_gb:g} GiB x {args.gpu_memory_utilization:g}")
    header = f"{'model':<12} {'layers':>6} {'kv_heads':>8} {'head_dim':>8} {'KiB/token':>10} {'MiB/seq':>9} " \
             f"{'max batch':>9} {'tokens in cache':>15}"
    print(header)
    for r in rows:
        print(f"{r['model']:<12} {r['layers']:>6} {r['kv_heads']:>8} {r['head_dim']:>8} "
              f"{r['kv_bytes_per_token'] / 1024:>10.1f} {r['kv_bytes_per_sequence'] / 2**20:>9.1f} "
              f"{r['max_batch_size']:>9} {r['max_tokens_in_cache']:>15,}")
    result = {"config": vars(args), "models": rows}
    if args.check:
        check = measured_check()
        print("\nformula vs measured cache (smollm2-135m, trained weights, float32 model, cpu)")
        for r in check:
            print(f"  {r['cache']:<14} {r['kv_cache_dtype']:<8} {r['tokens']} tokens: predicted "
                  f"{r['predicted_bytes']:,.0f} B, measured {r['measured_bytes']:,} B -> "
                  f"{'match' if r['match'] else 'MISMATCH'}")
        result["measured_check"] = check
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
