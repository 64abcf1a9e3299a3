"""The repository's main job (README's first command).

For now: load the default model, answer one chat prompt with our model and with transformers' `generate`, and print
tokens/s, peak memory and whether the greedy texts are identical. The full case study grows here step by step.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.__main__ import add_model_args
from core.errors import cli
from core.measure import run_isolated
from optimization.quickstart import PROMPT, run_ours, run_transformers


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m optimization", description=__doc__)
    add_model_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    common = (args.model, args.device, args.dtype, args.random_weights, args.max_tokens)

    print(f"our model and transformers.generate, greedy, {args.max_tokens} new tokens, one process each")
    ours, ours_rss = run_isolated(run_ours, *common)
    theirs, theirs_rss = run_isolated(run_transformers, *common)
    identical = ours["tokens"] == theirs["tokens"][: len(ours["tokens"])] and len(ours["tokens"]) <= len(theirs["tokens"])

    print(f"\nprompt: {PROMPT}\nanswer (ours): {ours['text'].strip()}\n")
    rows = [("implementation", "tokens", "tokens/s", "peak RSS MB", "peak GPU MB"),
            ("ours (core.generate)", len(ours["tokens"]), f"{ours['tokens_per_s']:.1f}", f"{ours_rss:.0f}",
             f"{ours['gpu_peak_mb']:.0f}"),
            ("transformers generate", len(theirs["tokens"]), f"{theirs['tokens_per_s']:.1f}", f"{theirs_rss:.0f}",
             f"{theirs['gpu_peak_mb']:.0f}")]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print(f"\nidentical greedy text: {'yes' if identical else 'NO'}   model: {ours['label']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": ours["label"], "identical_greedy": identical,
                                        "ours": {**ours, "peak_rss_mb": ours_rss},
                                        "transformers": {**theirs, "peak_rss_mb": theirs_rss}}, indent=2))


if __name__ == "__main__":
    main()
