"""KV-cache memory waste: contiguous max-length allocation vs paging, from real sequence lengths.

Two measurements:
1. From ShareGPT's real prompt + reply lengths (evaluation split, no model run): a contiguous cache reserves
   max_model_len slots per sequence for its whole life; a paged cache reserves whole blocks, so at most one
   partly-filled block per sequence is wasted. Waste = reserved slots not holding a token, at each sequence's
   final length; and how many such sequences a fixed KV budget holds at once.
2. Measured in our engine: ShareGPT prompts run to the model's own EOS (capped), and after every step the slots
   of the blocks in use are compared with the tokens they hold, and with what contiguous allocation of the same
   running sequences would have reserved.

    python -m engines.teaching.kv_fragmentation --out kv_fragmentation.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.loading import load_model
from engines.ours import LLMEngine
from engines.teaching.drive import drive

from benchmarks.workloads import build_workload

GiB = 1 << 30


def reserved_slots(lengths: list[int], block_size: int | None, max_model_len: int) -> int:
    """Slots reserved for sequences of these lengths: whole blocks when paged, max_model_len each when contiguous."""
    if block_size is None:
        return max_model_len * len(lengths)
    return sum(-(-n // block_size) * block_size for n in lengths)


def sequences_that_fit(lengths: list[int], block_size: int | None, max_model_len: int, budget_slots: int) -> int:
    """How many of these sequences (in order, at their final lengths) fit in a budget of KV slots at once."""
    used = 0
    for i, n in enumerate(lengths):
        used += max_model_len if block_size is None else -(-n // block_size) * block_size
        if used > budget_slots:
            return i
    return len(lengths)


@cli
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--num-prompts", type=int, default=1000, help="ShareGPT requests for the length statistics")
    p.add_argument("--max-model-len", type=int, default=2048, help="what a contiguous cache reserves per sequence")
    p.add_argument("--block-sizes", default="1,8,16,32,64")
    p.add_argument("--kv-budget-gb", type=float, default=1.0, help="KV memory for the 'sequences that fit' column")
    p.add_argument("--engine-prompts", type=int, default=8, help="requests run through the engine (0 = skip)")
    p.add_argument("--engine-max-tokens", type=int, default=64, help="cap on replies in the engine run")
    p.add_argument("--block-size", type=int, default=16, help="block size of the engine run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        block_sizes = [int(b) for b in args.block_sizes.split(",")]
    except ValueError:
        raise UserError(f"--block-sizes takes a comma list of integers, got {args.block_sizes!r}") from None
    if min(block_sizes) < 1 or args.num_prompts < 1 or args.engine_prompts < 0:
        raise UserError("block sizes and --num-prompts must be at least 1")
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    cfg = lm.model.config
    bytes_per_token = cfg.kv_bytes_per_token(next(lm.model.parameters()).element_size())
    budget_slots = int(args.kv_budget_gb * GiB // bytes_per_token)

    specs = build_workload(lm.tokenizer, "sharegpt", args.num_prompts, args.seed,
                           max_input_len=args.max_model_len // 2)
    lengths = [min(s.prompt_len + s.output_len, args.max_model_len) for s in specs]
    used = sum(lengths)
    rows = []
    for bs in [None] + block_sizes:
        reserved = reserved_slots(lengths, bs, args.max_model_len)
        rows.append({"allocation": "contiguous" if bs is None else f"paged, block {bs}", "block_size": bs,
                     "waste": 1 - used / reserved, "sequences_that_fit": sequences_that_fit(
                         lengths, bs, args.max_model_len, budget_slots)})
    print(f"\n{len(lengths)} ShareGPT sequences (evaluation split, seed {args.seed}): mean {used / len(lengths):.0f} "
          f"tokens, max {max(lengths)}; contiguous reserves max_model_len {args.max_model_len}; "
          f"{args.kv_budget_gb} GiB of KV = {budget_slots:,} token slots ({lm.label})")
    print(f"{'allocation':<20}{'waste':>8}{'seqs in budget':>16}")
    for r in rows:
        print(f"{r['allocation']:<20}{r['waste']:>8.1%}{r['sequences_that_fit']:>16,}")

    measured = None
    if args.engine_prompts:
        run_specs = build_workload(lm.tokenizer, "sharegpt", args.engine_prompts, args.seed + 1,
                                   max_input_len=256, output_len=args.engine_max_tokens, ignore_eos=False)
        engine = LLMEngine(lm, max_num_seqs=args.engine_prompts, block_size=args.block_size,
                           max_model_len=256 + args.engine_max_tokens, enable_prefix_caching=False)
        samples = {"tokens": 0, "paged_slots": 0, "contiguous_slots": 0}

        def on_step(e: LLMEngine) -> None:
            running = e.scheduler.running
            samples["tokens"] += sum(s.num_computed_tokens for s in running)
            samples["paged_slots"] += sum(len(s.block_table) for s in running) * args.block_size
            samples["contiguous_slots"] += len(running) * args.max_model_len

        records, _ = drive(engine, run_specs, on_step=on_step)
        measured = {"requests": len(records), "mean_output_len": sum(r.output_len for r in records) / len(records),
                    "paged_waste": 1 - samples["tokens"] / samples["paged_slots"],
                    "contiguous_waste": 1 - samples["tokens"] / samples["contiguous_slots"]}
        print(f"\nMeasured in our engine over every step ({measured['requests']} ShareGPT prompts run to EOS, replies "
              f"capped at {args.engine_max_tokens}, mean {measured['mean_output_len']:.0f} tokens; block "
              f"{args.block_size}): slots reserved but empty, averaged over steps")
        print(f"{'paged':<20}{measured['paged_waste']:>8.1%}")
        print(f"{'contiguous':<20}{measured['contiguous_waste']:>8.1%}  (max_model_len {args.max_model_len} each)")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": lm.label, "args": vars(args), "from_lengths": rows,
                                              "measured_in_engine": measured}, indent=2))


if __name__ == "__main__":
    main()
