"""Our engine against vLLM on one GPU, in one run: offline throughput and batch-1 decode, random weights.

For each model shape (default: smollm2-135m and llama2-7b) and each engine, a fresh process (vLLM keeps GPU memory
until its process ends) builds the model with random weights and measures:
- offline throughput: `--num-requests` requests of `--input-len` random prompt tokens, each generating exactly
  `--output-len` tokens (ignore_eos), all submitted at once; output tokens / wall time;
- batch-1 decode: one request, (time for 1 + N new tokens - time for 1 new token) / N, median of 3 runs: the same
  method for both engines, so prefill and start-up costs cancel.
vLLM runs as `vllm.LLM(model=DIR, load_format="dummy", skip_tokenizer_init=True)` on a folder holding only the
shape's config.json, with token-id prompts; ours as `engines.ours.LLM` on `core` random weights.

    python -m engines.gpu_bench --out gpu_bench.json                       # the GPU run (H100: a few minutes)
    python -m engines.gpu_bench --engines ours --device cpu --models tiny --num-requests 16 --input-len 32 \\
        --output-len 16 --batch1-tokens 8                                  # the code path, on a CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from core.errors import UserError, cli

# ours-uncompiled: ours without torch.compile of its layers; ours-sync: without async scheduling (each step waits
# for its own tokens before the next is scheduled)
ENGINES = ("vllm", "ours", "ours-uncompiled", "ours-sync")
# Ours runs at most this many sequences at once (vLLM's default on a large GPU), and never more than its KV cache
# holds whole (`kv_capacity_in_requests`): admitting more only leads to preemption. The 7B shape's cache holds ~200
# 528-token sequences on an 80 GB H100, ~420 on a 141 GB H200; the 135M shape's holds all 1000 requests.
MAX_NUM_SEQS = 1024
KV_CACHE_GB_ON_CPU = 2.0


def random_prompts(num: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab_size) for _ in range(length)] for _ in range(num)]


def median_decode_ms(generate_one, n_tokens: int, repeats: int = 3) -> float:
    """Batch-1 ms per decoded token: (time for 1 + n tokens - time for 1 token) / n, median over repeats."""
    per_token = []
    for _ in range(repeats):
        t = time.perf_counter()
        generate_one(1)
        short = time.perf_counter() - t
        t = time.perf_counter()
        generate_one(1 + n_tokens)
        per_token.append((time.perf_counter() - t - short) / n_tokens * 1e3)
    return statistics.median(per_token)


def check_against_reference_path(lm, torch_compile: bool = False) -> float:
    """Largest logit difference between the fast path (CUDA graphs + Triton attention, where available) and the
    reference path (eager, gather + SDPA), relative to the largest logit, over 8 staggered-length prompts.

    Both engines schedule identically (ignore_eos), so their steps line up row for row; steps are compared until
    the first step whose greedy tokens differ (after it the inputs differ). Half-precision rounding gives ~1e-2;
    a broken fast path gives ~1."""
    import torch

    from core.generate import SamplingParams
    from core.measure import worst_error
    from engines.ours import LLM

    prompts = [p[:8 + 5 * i] for i, p in enumerate(random_prompts(8, 48, lm.model.config.vocab_size, seed=2))]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    kw = dict(max_num_seqs=8, num_kv_blocks=64, block_size=16, max_model_len=128, skip_tokenizer_init=True)
    reference = LLM(lm, enforce_eager=True, **kw)
    reference.runner.cache.use_triton = False
    fast = LLM(lm, torch_compile=torch_compile, **kw)
    logits = []
    for llm in (reference, fast):
        seen, sample = [], llm.runner.sample
        llm.runner.sample = lambda x, seqs, seen=seen, sample=sample: seen.append(x.float().cpu()) or sample(x, seqs)
        llm.generate(prompts, params, use_tqdm=False)
        logits.append(seen)
    errors = []
    for a, b in zip(*logits):
        errors.append((a - b).abs().max() / a.abs().max())
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break
    return worst_error(errors)


FAST_TO_SAFE = ("cuda graphs + triton", "eager + triton", "eager + gather")


def build_ours(lm, args: argparse.Namespace, max_num_seqs: int, mode: str, torch_compile: bool,
               async_scheduling: bool = True):
    from engines.ours import LLM
    llm = LLM(lm, max_num_seqs=max_num_seqs, skip_tokenizer_init=True, max_model_len=request_len(args),
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=mode != FAST_TO_SAFE[0],
              torch_compile=torch_compile and mode != "eager + gather", async_scheduling=async_scheduling,
              gpu_memory_utilization=args.gpu_memory_utilization,
              kv_cache_memory_gb=None if lm.model.embed_tokens.weight.is_cuda else KV_CACHE_GB_ON_CPU)
    if mode == "eager + gather":
        llm.runner.cache.use_triton = False
    return llm


def request_len(args: argparse.Namespace) -> int:
    """Tokens one request may reach, both engines' max_model_len: prompt + output, and 16 to spare."""
    return args.input_len + args.output_len + 16


def kv_capacity_in_requests(lm, args: argparse.Namespace, block_size: int = 16) -> int:
    """How many of the benchmark's requests (request_len tokens each) our KV cache holds whole, with the memory the
    engine will get."""
    from engines.ours.llm_engine import kv_cache_blocks
    on_cpu = not lm.model.embed_tokens.weight.is_cuda
    blocks = kv_cache_blocks(lm, block_size, None, KV_CACHE_GB_ON_CPU if on_cpu else None, args.gpu_memory_utilization)
    return blocks // -(-request_len(args) // block_size)


def run_ours(args: argparse.Namespace, torch_compile: bool, async_scheduling: bool) -> dict:
    import torch

    from core.generate import SamplingParams
    from core.loading import load_model

    lm = load_model(args.model, args.device, args.dtype, random_weights=True)
    try:
        logit_error = check_against_reference_path(lm, torch_compile)
    except Exception as e:  # reported, and the fallbacks below show which part failed
        traceback.print_exc()
        logit_error, failures = None, [f"check: {type(e).__name__}: {e}"]
    else:
        failures = []
    max_num_seqs = args.max_num_seqs or max(1, min(MAX_NUM_SEQS, kv_capacity_in_requests(lm, args)))
    vocab = lm.model.config.vocab_size
    prompts = random_prompts(args.num_requests, args.input_len, vocab)
    # One GPU run must give numbers: if the fast path fails here, fall back step by step and say so in the result.
    llm = None
    for mode in FAST_TO_SAFE:
        try:
            t = time.perf_counter()
            llm = build_ours(lm, args, max_num_seqs, mode, torch_compile, async_scheduling)
            startup_s = time.perf_counter() - t
            llm.generate(prompts[:8], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
            break
        except Exception as e:
            traceback.print_exc()
            failures.append(f"{mode}: {type(e).__name__}: {e}")
            llm = None
        gc.collect()  # outside `except`: its traceback, which holds the half-built engine, is gone by now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if llm is None:
        raise RuntimeError("every mode of our engine failed: " + " | ".join(failures))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True))
    sync()
    elapsed = time.perf_counter() - t
    one = random_prompts(1, args.input_len, vocab, seed=1)
    ms = median_decode_ms(lambda n: llm.generate(one, SamplingParams(max_tokens=n, ignore_eos=True), use_tqdm=False),
                          args.batch1_tokens)
    return {"elapsed_s": elapsed, "output_tokens": sum(len(o.token_ids) for o in outs), "batch1_ms_per_token": ms,
            "startup_s": startup_s, "num_preemptions": llm.scheduler.num_preemptions,
            "fast_vs_reference_logit_error": logit_error, "failures": failures,
            "config": {"mode": mode, "max_num_seqs": max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                       "num_kv_blocks": llm.block_manager.num_blocks, "block_size": llm.block_manager.block_size,
                       "cuda_graphs": llm.runner.graphs is not None, "async_scheduling": llm.async_scheduling,
                       "torch_compile": torch_compile and mode != "eager + gather",
                       "decode_attention": "triton" if llm.runner.cache.use_triton else "torch gather + SDPA"},
            "label": llm.label}


def run_vllm(args: argparse.Namespace) -> dict:
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from vllm import LLM, SamplingParams

    from core.registry import REGISTRY
    cfg = REGISTRY[args.model].config
    folder = Path(tempfile.mkdtemp(prefix="llmip-vllm-"))
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": args.dtype or "bfloat16"}))
    t = time.perf_counter()
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype or "bfloat16",
              max_model_len=request_len(args), seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization)
    startup_s = time.perf_counter() - t

    def params(n: int):
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)

    prompts = [{"prompt_token_ids": p} for p in random_prompts(args.num_requests, args.input_len, cfg.vocab_size)]
    llm.generate(prompts[:8], params(8), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, params(args.output_len))
    elapsed = time.perf_counter() - t
    one = [{"prompt_token_ids": random_prompts(1, args.input_len, cfg.vocab_size, seed=1)[0]}]
    ms = median_decode_ms(lambda n: llm.generate(one, params(n), use_tqdm=False), args.batch1_tokens)
    return {"elapsed_s": elapsed, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "batch1_ms_per_token": ms, "startup_s": startup_s,
            "config": {"vllm_version": vllm.__version__, "load_format": "dummy", "enforce_eager": False},
            "label": f"{args.model} (RANDOM weights (speed only))"}


def run_in_subprocess(engine: str, model: str, args: argparse.Namespace) -> dict:
    """One engine on one shape in a fresh process; a failure becomes an error row, not a crash of the whole run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "engines.gpu_bench", "--worker", engine, "--worker-model", model,
               "--worker-out", str(out)] + args.passthrough
        print(f"\n=== {engine} on {model}: {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, timeout=args.timeout)
        if done.returncode != 0 or not out.exists():
            return {"engine": engine, "model": model, "error": f"exit code {done.returncode}"}
        result = json.loads(out.read_text())
    result.update(engine=engine, model=model, output_throughput=result["output_tokens"] / result["elapsed_s"])
    return result


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.num_requests} requests x ({args.input_len} prompt + {args.output_len} output tokens, ignore_eos), "
          f"offline; batch-1 decode over {args.batch1_tokens} tokens; {device}, {args.dtype or 'bfloat16'}, "
          "RANDOM weights (speed only)")
    print(f"{'model':<14} {'engine':<12} {'out tok/s':>11} {'vs vLLM':>8} {'batch-1 ms/tok':>15} {'wall s':>8}"
          f" {'logit err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14} {r['engine']:<12} failed: {r['error']}")
            continue
        ref = next((v for v in rows if v["model"] == r["model"] and v["engine"] == "vllm" and "error" not in v), None)
        ratio = f"{r['output_throughput'] / ref['output_throughput']:.2f}x" if ref else "-"
        err = r.get("fast_vs_reference_logit_error")
        print(f"{r['model']:<14} {r['engine']:<12} {r['output_throughput']:>11,.0f} {ratio:>8} "
              f"{r['batch1_ms_per_token']:>15.2f} {r['elapsed_s']:>8.1f} {'-' if err is None else f'{err:.1e}':>10}")
    for r in rows:
        if r.get("failures"):
            print(f"note: ours on {r['model']} ran as '{r['config']['mode']}' after: " + " | ".join(r["failures"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="vllm,ours", help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--models", default="smollm2-135m,llama2-7b", help="comma list of registry shapes")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--batch1-tokens", type=int, default=256, help="tokens decoded in the batch-1 measurement")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default bfloat16 on GPU")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"ours (default: {MAX_NUM_SEQS}, or as many requests as its KV cache holds whole if fewer)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="ours: token budget of a step")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--timeout", type=int, default=600, help="seconds per engine and model")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    engines = args.engines.split(",")
    if any(e not in ENGINES for e in engines):
        raise UserError(f"--engines takes a comma list of {', '.join(ENGINES)}, got {args.engines!r}")
    args.engine_list, args.model_list = engines, args.models.split(",")
    if min(args.num_requests, args.input_len, args.output_len, args.batch1_tokens) < 1:
        raise UserError("--num-requests, --input-len, --output-len and --batch1-tokens must be at least 1")
    from core.registry import REGISTRY
    unknown = [m for m in args.model_list if m not in REGISTRY]
    if unknown:
        raise UserError(f"unknown model shape(s) {unknown}: use registry names (python -m core models)")
    return args


@cli
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        args.model = args.worker_model
        result = (run_vllm(args) if args.worker == "vllm" else
                  run_ours(args, args.worker != "ours-uncompiled", args.worker != "ours-sync"))
        Path(args.worker_out).write_text(json.dumps(result))
        return
    # Workers get the same options, minus the ones only the parent uses.
    skip = {"--engines", "--models", "--out", "--timeout"}
    args.passthrough = [a for i, a in enumerate(argv) if a not in skip and (i == 0 or argv[i - 1] not in skip)
                        and not any(a.startswith(s + "=") for s in skip)]
    rows = []
    for m in args.model_list:
        for e in args.engine_list:
            rows.append(run_in_subprocess(e, m, args))
            print_table(rows, args)
            if args.out:  # after every row: a run cut short still leaves what it measured
                Path(args.out).write_text(json.dumps(
                    {"args": {k: v for k, v in vars(args).items() if k != "passthrough"}, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
