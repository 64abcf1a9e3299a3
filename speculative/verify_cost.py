"""What one verification pass costs: the time of a forward of T tokens against a plain decode step (T = 1).

Every method in this chapter trades one target pass per token for one pass of 1 + k tokens (a draft chain, a Medusa
tree, a lookahead window) that emits `tokens per pass` tokens. So its speed-up is at most

    tokens per pass / (cost of a T-token pass / cost of a 1-token pass)

before any proposal cost. On a GPU at batch 1 a pass of a few dozen tokens costs about what one token costs (the
weights are read once either way); on a CPU it does not, and this script measures by how much, with PyTorch's
default Linear (MKL's GEMM, which takes slow paths for a few rows on AMD CPUs) and with the weights prepacked for
oneDNN (core/cpu_linear.py, what speculative/benchmark.py uses on a CPU).

It also prints what the pass computes differently: the largest logit difference between a pass of T tokens and the
same T tokens fed one plain step at a time. The two run the products with different row counts, so with different
blockings and reduction orders; greedy speculation emits plain decoding's tokens only while this difference stays
below the gap between the two likeliest tokens. In float32 it is ~1e-4; in bfloat16, whose logits keep 8 bits of
mantissa (ties between the top two are common), it is ~0.5, and greedy outputs part from plain decoding's.

    python -m speculative.verify_cost                    # default model, this CPU
    python -m speculative.verify_cost --sizes 1,5,20 --out cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.results import machine_info
from core.__main__ import add_model_args
from core.cpu_linear import can_pack, pack_linears
from core.errors import cli
from core.loading import load_model
from speculative.common import RollbackKVCache, forward


@torch.inference_mode()
def pass_times(model, sizes: list[int], context: int = 200, steps: int = 12, repeats: int = 3) -> dict[int, float]:
    """Median seconds of a forward of T tokens after `context` cached tokens, for each T in sizes (the cache is
    rolled back after each pass, as after a fully rejected draft, so every pass sees the same context length)."""
    prompt = list(range(100, 100 + context))
    times = {}
    for T in sizes:
        samples = []
        for _ in range(repeats):
            cache = RollbackKVCache.for_model(model, 1, context + steps + max(sizes) + 1)
            forward(model, cache, prompt, 0)
            for i in range(steps):
                t0 = time.perf_counter()
                forward(model, cache, list(range(T)), context + i)
                samples.append(time.perf_counter() - t0)
                cache.truncate(context + i + 1)  # keep one token: the next pass starts one position later
        times[T] = statistics.median(samples)
    return times


@torch.inference_mode()
def pass_drift(model, sizes: list[int], context: int = 200) -> dict[int, float]:
    """The largest |logit difference| between one pass of T tokens and T one-token steps over the same tokens, after
    `context` cached tokens, for each T in sizes."""
    prompt = list(range(100, 100 + context))
    drift = {}
    for T in sizes:
        cache = RollbackKVCache.for_model(model, 1, context + T)
        forward(model, cache, prompt, 0)
        steps = torch.cat([forward(model, cache, [token], context + token) for token in range(T)])
        cache.truncate(context)
        drift[T] = float((forward(model, cache, list(range(T)), context) - steps).abs().max())
    return drift


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speculative.verify_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--sizes", default="1,2,3,5,9,20,33",
                        help="tokens per pass (5 = Medusa's chain of 4, 20 = its default tree of 19 + 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sorted({1, *(int(s) for s in args.sizes.split(","))})
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    device = next(lm.model.parameters()).device
    results = {"F.linear": pass_times(lm.model, sizes)}
    drift = {"F.linear": pass_drift(lm.model, sizes)}
    if device.type == "cpu" and can_pack(lm.model.lm_head):
        results["oneDNN packed"] = pass_times(pack_linears(lm.model), sizes)
        drift["oneDNN packed"] = pass_drift(lm.model, sizes)
    print(f"{lm.label} on {device}, batch 1, 200 cached tokens; median of 36 passes each; max |dlogit|: the largest "
          f"logit difference from T one-token steps")
    print(f"{'tokens per pass':>16}" + "".join(f"{name + ' ms':>20}{'x 1 token':>11}{'max |dlogit|':>14}"
                                               for name in results))
    for T in sizes:
        print(f"{T:>16}" + "".join(f"{results[name][T] * 1e3:>20.2f}{results[name][T] / results[name][1]:>11.2f}"
                                   f"{drift[name][T]:>14.1e}" for name in results))
    if args.out:
        args.out.write_text(json.dumps({"model": lm.label, "device": str(device), "threads": torch.get_num_threads(),
                                        "machine": machine_info(),
                                        "seconds": {name: {str(T): s for T, s in t.items()}
                                                    for name, t in results.items()},
                                        "max_logit_difference": {name: {str(T): d for T, d in t.items()}
                                                                 for name, t in drift.items()}}, indent=2))


if __name__ == "__main__":
    main()
