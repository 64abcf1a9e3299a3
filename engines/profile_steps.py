"""Where serving time goes: our engine's steps under Poisson arrivals, split into decode-only steps and steps that
carry a prefill chunk.

Offline, every request arrives at once and prefills together; served, requests keep arriving, so prefill chunks
keep landing in the running batch. When our engine replayed CUDA graphs only for decode-only steps, the two kinds
of step cost very different amounts (this script found that: 2.6 against 35 ms on an H100), and every running
sequence waits for both; now both kinds replay graphs (cuda_graphs.py). This drives the engine in process
(no HTTP, so the server's own work is left out) with the arrivals a serving benchmark would send and times each
step: a table by kind, and JSON with every step.

Each step also records what else happened during it (engines/stall_trace.py): Triton kernels compiled, time in
Python's garbage collector, the CUDA caching allocator's cudaMalloc calls and retries. The slowest steps are printed
with those; `--repeat 2` serves the same arrivals again on the warmed engine, which tells a first-time cost
(compilation) from a recurring one.

    python -m engines.profile_steps --model smollm2-135m --random-weights --request-rate 16   # GPU
    python -m engines.profile_steps --workload-file workload.json --request-rate 16            # ShareGPT lengths
    python -m engines.profile_steps --model llama2-7b --random-weights --int4 --max-num-seqs 128 \
        --max-num-batched-tokens 8192 --workload-file workload.json --request-rate 2.6 --repeat 2   # the case study's
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams
from core.loading import load_model
from engines.stall_trace import StallTrace, allocator_events


def request_lengths(args) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request: from a saved workload, or fixed."""
    if args.workload_file:
        from benchmarks.workloads import load_workload
        return [(s.prompt_len, min(s.output_len, args.max_output_len or s.output_len))
                for s in load_workload(args.workload_file, args.num_prompts)]
    return [(args.input_len, args.output_len)] * args.num_prompts


def run(llm, lengths: list[tuple[int, int]], rate: float, vocab: int, seed: int = 0) -> list[dict]:
    """Serve the requests at `rate` (Poisson, seeded); one record per step: its kind, tokens, sequences, ms."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in lengths:
        t += rng.expovariate(rate)
        arrivals.append(t)
    batches = []
    launch = llm.runner.launch

    def recording_launch(batch, previous=None):  # the step's batch, seen on its way to the model
        batches.append(batch)
        return launch(batch, previous)

    llm.runner.launch = recording_launch
    steps, nxt, start = [], 0, time.perf_counter()
    with StallTrace().active() as trace:
        while nxt < len(lengths) or llm.has_unfinished_requests():
            now = time.perf_counter() - start
            while nxt < len(lengths) and arrivals[nxt] <= now:
                prompt_len, output_len = lengths[nxt]
                prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
                llm.add_request(str(nxt), prompt, SamplingParams(max_tokens=output_len, ignore_eos=True))
                nxt += 1
            if not llm.has_unfinished_requests():
                time.sleep(max(arrivals[nxt] - now, 0))
                continue
            trace.take()  # what happened between steps (adding requests, sleeping) is not the step's
            mallocs, retries = allocator_events()
            t0 = time.perf_counter()
            llm.step()  # returns after the sampled tokens reached the host: the step's GPU work is done
            ms = (time.perf_counter() - t0) * 1e3
            mallocs_after, retries_after = allocator_events()
            if not batches:
                continue
            batch = batches.pop()
            prefill = sum(n for n in batch.num_tokens if n > 1)
            steps.append({"kind": "with prefill" if prefill else "decode only", "ms": ms, "seqs": len(batch.seqs),
                          "tokens": sum(batch.num_tokens), "prefill_tokens": prefill, "at_s": t0 - start,
                          "cuda_mallocs": mallocs_after - mallocs, "alloc_retries": retries_after - retries,
                          **trace.take()})
    llm.runner.launch = launch
    return steps


def summary(steps: list[dict]) -> dict:
    total = sum(s["ms"] for s in steps)
    out = {}
    for kind in ("decode only", "with prefill"):
        ms = [s["ms"] for s in steps if s["kind"] == kind]
        if ms:
            out[kind] = {"steps": len(ms), "mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms),
                         "p99_ms": sorted(ms)[int(0.99 * (len(ms) - 1))], "share_of_time": sum(ms) / total,
                         "mean_seqs": statistics.fmean(s["seqs"] for s in steps if s["kind"] == kind)}
    return out


def print_slowest(steps: list[dict], n: int = 8) -> None:
    """The n slowest steps with what happened during them."""
    print(f"{'slowest steps':<15}{'at s':>7}{'ms':>9}{'tokens':>8}{'seqs':>6}{'gc ms':>8}{'mallocs':>9}"
          f"{'retries':>8}  compiled")
    for s in sorted(steps, key=lambda s: -s["ms"])[:n]:
        print(f"{'':<15}{s['at_s']:>7.2f}{s['ms']:>9.1f}{s['tokens']:>8}{s['seqs']:>6}{s['gc_ms']:>8.1f}"
              f"{s['cuda_mallocs']:>9}{s['alloc_retries']:>8}  {', '.join(s['triton_compiles']) or '-'}")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.profile_steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--request-rate", type=float, default=16.0, help="requests per second (Poisson)")
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--workload-file", type=Path, help="request lengths from a saved workload (JSON)")
    parser.add_argument("--input-len", type=int, default=128, help="without a workload file")
    parser.add_argument("--output-len", type=int, default=128, help="without a workload file")
    parser.add_argument("--max-output-len", type=int, help="with a workload file: replies capped at this length")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--int4", action="store_true",
                        help="RTN INT4 g128 layers, LM head and embedding INT4 g32, as the case study's INT4 steps "
                             "(Triton kernels on a GPU; no torch.compile of the layers, as there)")
    parser.add_argument("--repeat", type=int, default=1, help="serve the same arrivals this many times in a row")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no torch.compile")
    parser.add_argument("--no-warm-up", action="store_true", help="measure from a cold engine")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.request_rate <= 0 or args.num_prompts < 1 or args.repeat < 1:
        raise UserError("--request-rate must be positive, --num-prompts and --repeat at least 1")
    from engines.ours import LLM

    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    on_cuda = next(lm.model.parameters()).is_cuda
    if args.int4:
        from quantization.linear import pick_group_size, quantize_embeddings, quantize_model, set_backend

        quantize_model(lm.model, "int4", pick_group_size(lm.model, 0))
        quantize_embeddings(lm.model)
        set_backend(lm.model, "triton" if on_cuda else "torch")
    lengths = request_lengths(args)
    if max(p + o for p, o in lengths) > args.max_model_len:
        raise UserError(f"a request needs more than --max-model-len {args.max_model_len} tokens")
    llm = LLM(lm, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
              torch_compile=False if args.int4 else None,
              async_scheduling=False,  # each step() then times its own step
              enable_prefix_caching=False, skip_tokenizer_init=True)
    vocab = min(lm.model.config.vocab_size, 32000)
    if not args.no_warm_up:
        llm.warm_up()  # what the server does at start-up: compilation before the first request
    rounds = [run(llm, lengths, args.request_rate, vocab) for _ in range(args.repeat)]
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    runner = llm.runner
    mode = ("no CUDA graphs" if runner.graphs is None or not on_cuda else
            "CUDA graphs for every step" if runner.mixed_graphs else "CUDA graphs for decode-only steps")
    for i, steps in enumerate(rounds, 1):
        print(f"\n{lm.label} on {device}: {len(lengths)} requests at {args.request_rate:g} req/s (Poisson), {mode}; "
              f"{len(steps)} steps" + (f"; round {i} of {len(rounds)}" if len(rounds) > 1 else ""))
        print(f"{'step':<14}{'steps':>7}{'mean ms':>9}{'median ms':>11}{'p99 ms':>8}{'share of time':>15}{'seqs':>7}")
        for kind, r in summary(steps).items():
            print(f"{kind:<14}{r['steps']:>7}{r['mean_ms']:>9.2f}{r['median_ms']:>11.2f}{r['p99_ms']:>8.2f}"
                  f"{r['share_of_time']:>14.0%}{r['mean_seqs']:>7.1f}")
        print_slowest(steps)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": lm.label, "device": device, "request_rate": args.request_rate,
                                        "num_prompts": len(lengths), "enforce_eager": args.enforce_eager,
                                        "warm_up": not args.no_warm_up, "int4": args.int4,
                                        "rounds": [{"summary": summary(steps), "steps": steps} for steps in rounds]}))
        print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
