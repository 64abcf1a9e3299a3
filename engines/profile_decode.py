"""Where a decode step's GPU time goes: kernels per step, and how much of their time is the weight-reading matmuls.

Batch-1 decode should cost little more than reading the weights once. This runs our engine's decode steps under
torch.profiler, eagerly (so every kernel shows up on its own; a CUDA graph replays the same kernels without the
launch gaps), once as written and once with the layers compiled, and sorts each kernel into "matmul" (cuBLAS /
GEMV / GEMM kernels), "attention" (our Triton paged kernel) or "other" (norms, RoPE, activations, copies).

    python -m engines.profile_decode --model llama2-7b --random-weights      # GPU (H100: under a minute)
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams
from core.loading import load_model

MATMUL_NAMES = ("gemm", "gemv", "cublas", "cutlass", "sm90_xmma", "nvjet", "splitk")


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    if any(k in name for k in MATMUL_NAMES):
        return "matmul"
    return "attention" if "paged_decode" in name else "other"


def profile_steps(llm, prompt: list[int], steps: int) -> dict:
    """Kernel count and GPU time per decode step, by kind, over `steps` batch-1 decode steps after the prompt."""
    seq = llm.add_request(None, prompt, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    llm.step()  # the prefill, not profiled
    llm.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
    while not seq.is_finished:
        llm.step()
    count, time_us = defaultdict(int), defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kind_of(e.name)
            count[k] += 1
            time_us[k] += e.device_time
    return {k: {"kernels_per_step": count[k] / steps, "ms_per_step": time_us[k] / steps / 1e3}
            for k in ("matmul", "attention", "other")}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.profile_decode", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("profile_decode measures GPU kernels: it needs a CUDA device")
    from engines.ours import LLM
    lm = load_model(args.model, "cuda", args.dtype, args.random_weights)
    prompt = torch.randint(10, min(lm.model.config.vocab_size, 32000), (args.prompt_len,)).tolist()
    rows = {}
    for name, compiled in (("eager", False), ("compiled layers", True)):
        llm = LLM(lm, enforce_eager=True, torch_compile=compiled, max_num_seqs=4, num_kv_blocks=64,
                  max_model_len=args.prompt_len + args.steps + 16, skip_tokenizer_init=True)
        profile_steps(llm, prompt, 4)  # warm-up (and compilation)
        rows[name] = profile_steps(llm, prompt, args.steps)
        del llm
    weight_gb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 1e9
    print(f"{lm.label}: batch-1 decode step after a {args.prompt_len}-token prompt, GPU kernel time per step "
          f"(weights {weight_gb:.2f} GB)")
    print(f"{'':<16} {'kernels':>8} {'matmul ms':>10} {'attention ms':>13} {'other ms':>9} {'other kernels':>14}")
    for name, r in rows.items():
        total = sum(v["kernels_per_step"] for v in r.values())
        print(f"{name:<16} {total:>8.0f} {r['matmul']['ms_per_step']:>10.2f} {r['attention']['ms_per_step']:>13.2f} "
              f"{r['other']['ms_per_step']:>9.2f} {r['other']['kernels_per_step']:>14.0f}")
    if args.out:
        args.out.write_text(json.dumps({"model": lm.label, "weight_gb": weight_gb, "prompt_len": args.prompt_len,
                                        "steps": args.steps, "device": torch.cuda.get_device_name(), "rows": rows},
                                       indent=2))


if __name__ == "__main__":
    main()
