"""Where a steady decode step of our engine spends its time: GPU kernels by name, and the host's share.

Offline throughput and the case study's tuned step both spend nearly all their time in decode steps of a full batch.
This fills the engine with `--num-seqs` requests at once, lets them all prefill, then records `--steps` decode steps
with torch.profiler: per step the sum of GPU kernel times (the GPU's busy time) and the kernels that took the most
time. The wall time per step (what a user waits) is taken twice: over as many steps just before, without the
profiler, and under it, whose per-op bookkeeping adds host time. Unprofiled wall minus GPU time is the time the GPU
waits for Python each step.
`--int4 triton|torch` first quantizes the decoder layers' projections (RTN INT4, group 128) as the case study does.

    python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 256      # GPU
    python -m engines.profile_kernels --model llama2-7b --random-weights --num-seqs 64 --int4 triton
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import OrderedDict, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams
from core.loading import load_model


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.profile_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num-seqs", type=int, default=256, help="requests decoding together")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="decode steps recorded")
    parser.add_argument("--int4", choices=("triton", "torch"), help="RTN INT4 g128 projections with this backend")
    parser.add_argument("--shuffle-blocks", action="store_true",
                        help="hand out KV blocks in a random order (default: the pool's order, as a fresh engine does)")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: keys and values stored in 8 bits (half the bytes each decode step reads)")
    parser.add_argument("--eager-elementwise", action="store_true",
                        help="uncompiled layers' norms, rope and activation as PyTorch ops, not the fused Triton "
                             "kernels (engines/ours/triton_elementwise.py): the before of that change")
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.num_seqs < 1 or args.steps < 1:
        raise UserError("--num-seqs and --steps must be at least 1")
    from engines.ours import LLM

    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    if args.int4:
        from quantization.linear import pick_group_size, quantize_model, set_backend
        quantize_model(lm.model, "int4", pick_group_size(lm.model, 128))
        set_backend(lm.model, args.int4)
    on_cuda = lm.model.lm_head.weight.is_cuda
    llm = LLM(lm, max_num_seqs=args.num_seqs, max_model_len=args.input_len + 2 * args.steps + 64,
              enable_prefix_caching=False, skip_tokenizer_init=True, kv_cache_dtype=args.kv_cache_dtype,
              torch_compile=False if args.int4 else None,  # INT4 layers uncompiled, as in optimization/steps.py
              triton_elementwise=not args.eager_elementwise)
    if args.shuffle_blocks:
        free = list(llm.block_manager.allocator.free)
        random.Random(0).shuffle(free)
        llm.block_manager.allocator.free = OrderedDict.fromkeys(free)
    vocab = min(lm.model.config.vocab_size, 32000)
    for i in range(args.num_seqs):
        prompt = [(31 * i + 7 * j) % (vocab - 10) + 10 for j in range(args.input_len)]
        llm.add_request(str(i), prompt, SamplingParams(max_tokens=2 * args.steps + 32, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in llm.requests.values()):
        llm.step()  # every prompt prefilled; the next steps are decode-only steps of the full batch
    for _ in range(3):
        llm.step()
    plain_ms = timed_steps(llm, args.steps, on_cuda)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        wall_ms = timed_steps(llm, args.steps, on_cuda)

    kernels: dict[str, float] = defaultdict(float)  # microseconds over all recorded steps
    for e in prof.events():
        if on_cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] += e.device_time
    gpu_ms = sum(kernels.values()) / 1e3 / args.steps
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    quant = (f", INT4 g128 ({args.int4} backend)" if args.int4 else "") + (
        f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype != "auto" else "")
    print(f"\n{lm.label}{quant} on {device}: decode steps of {args.num_seqs} sequences at ~{args.input_len} tokens")
    print(f"wall {plain_ms:.2f} ms per step ({wall_ms:.2f} under the profiler); GPU kernels {gpu_ms:.2f} ms per step"
          + (f" ({gpu_ms / plain_ms:.0%} busy)" if on_cuda else " (no CUDA: kernels not recorded)"))
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]
    for name, us in top:
        print(f"{us / 1e3 / args.steps:8.3f} ms  {us / 1e3 / args.steps / gpu_ms:5.1%}  {name[:110]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": lm.label, "device": device, "int4": args.int4,
                                        "kv_cache_dtype": args.kv_cache_dtype,
                                        "eager_elementwise": args.eager_elementwise,
                                        "num_seqs": args.num_seqs, "input_len": args.input_len, "steps": args.steps,
                                        "wall_ms_per_step": plain_ms, "profiled_wall_ms_per_step": wall_ms,
                                        "gpu_kernel_ms_per_step": gpu_ms,
                                        "top_kernels_ms_per_step": {n: us / 1e3 / args.steps for n, us in top}},
                                       indent=1))
        print(f"JSON: {args.out}")


def timed_steps(llm, steps: int, on_cuda: bool) -> float:
    """Milliseconds per engine step over `steps` steps. With async scheduling one step is in flight at the end as at
    the start, so this is the steady-state rate, not the sum of isolated steps."""
    if on_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        llm.step()
    return (time.perf_counter() - start) * 1e3 / steps


if __name__ == "__main__":
    main()
