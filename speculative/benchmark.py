"""Plain decoding against every speculative method, on the same prompts, batch 1, greedy.

Prompts come from the ShareGPT evaluation split, three kinds: chat (first user turns), code (a code block from a
conversation with "refactor this code"), and edit (a reply's text with "rewrite/summarise this text"). For each
prompt the script runs plain decoding and each method back to back (interleaved, so a noisy machine hurts them
alike), checks that the greedy output is token for token the plain one, and reports tokens/s, speed-up, tokens per
target pass (accepted drafts + 1) and the acceptance rate per draft position; then a sweep of k for the draft model
and prompt lookup, plotted as speed-up vs k. On a CPU every Linear (plain decoding's too) runs from weights prepacked
for oneDNN unless `--linear plain`: PyTorch's default GEMM makes a pass of a few tokens cost 1.5-2x a one-token
step on this AMD CPU, and that, not the methods, decided the CPU speed-ups before (speculative/verify_cost.py).

    python -m speculative.benchmark --threads 1                       # this CPU, a few minutes
    python -m speculative.benchmark --device cuda --num-prompts 8 --max-tokens 256 --out spec_gpu.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.results import machine_info
from core.__main__ import add_model_args
from core.cpu_linear import PackedLinear
from core.data import conversations
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt
from speculative.common import SpecStats, load_target, speculative_generate
from speculative.draft import load_draft, run_draft
from speculative.lookahead import run_lookahead
from speculative.draft_vocab import default_size, load_draft_vocab
from speculative.medusa import DynamicTree, committed_heads, load_heads, run_medusa, tree_choices
from speculative.prompt_lookup import run_prompt_lookup

CODE_BLOCK = re.compile(r"```[a-zA-Z]*\n(.{200,900}?)```", re.S)


def build_prompts(num_prompts: int) -> dict[str, list[str]]:
    """num_prompts texts per kind (chat, code, edit) from the ShareGPT evaluation split, in file order."""
    kinds: dict[str, list[str]] = {"chat": [], "code": [], "edit": []}
    for conv in conversations("evaluation"):
        turns = [t for _, t in conv["turns"]]
        first = turns[0].strip()
        if len(kinds["chat"]) < num_prompts and 20 <= len(first) <= 300 and "```" not in first and first.isascii():
            kinds["chat"].append(first)
        code = next((m.group(1) for t in turns for m in [CODE_BLOCK.search(t)] if m), None)
        if len(kinds["code"]) < num_prompts and code and code.isascii():
            kinds["code"].append(f"Refactor this code for readability without changing what it does:\n\n{code}")
        reply = turns[1].strip() if len(turns) > 1 else ""
        if len(kinds["edit"]) < num_prompts and 300 <= len(reply) <= 900 and "```" not in reply and reply.isascii():
            verb = ("Rewrite the following text, correcting any mistakes" if len(kinds["edit"]) % 2 == 0
                    else "Summarise the following text, quoting its key sentences")
            kinds["edit"].append(f"{verb}:\n\n{reply}")
        if all(len(v) == num_prompts for v in kinds.values()):
            return kinds
    raise UserError("not enough ShareGPT evaluation prompts of each kind")


PROMPTS_FILE = Path(__file__).parent / "prompts_eval.json"  # build_prompts(8), for machines without ShareGPT


def load_prompts(path: str | None, num_prompts: int) -> dict[str, list[str]]:
    """The first num_prompts per kind, from a JSON file written by --write-prompts or from ShareGPT itself."""
    if path is None:
        return build_prompts(num_prompts)
    try:
        kinds = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read prompts from {path}: {e}") from None
    if any(len(texts) < num_prompts for texts in kinds.values()):
        raise UserError(f"{path} has fewer than {num_prompts} prompts of some kind")
    return {kind: texts[:num_prompts] for kind, texts in kinds.items()}


def summarise(runs: list[dict], plain_s: float, plain_tokens: int) -> dict:
    stats = SpecStats()
    for r in runs:
        stats.merge(r["stats"])
    decode_s = sum(r["decode_s"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    return {"output_throughput": tokens / decode_s if decode_s else 0.0, "decode_s": decode_s,
            "speedup": plain_s / decode_s if decode_s else 0.0, "num_output_tokens": tokens,
            "plain_tokens": plain_tokens,
            "identical_to_plain": all(r["identical"] for r in runs),
            "mean_accepted_tokens_per_step": stats.mean_accepted_per_step,
            "draft_acceptance_rate": stats.draft_acceptance_rate,
            "acceptance_rate_per_pos": stats.acceptance_rate_per_pos}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts per kind (chat, code, edit)")
    parser.add_argument("--prompts", default=None,
                        help=f"prompts JSON (default: built from ShareGPT; {PROMPTS_FILE.name} holds 8 per kind)")
    parser.add_argument("--write-prompts", default=None, help="write --num-prompts per kind to this JSON and exit")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", "--num-speculative-tokens", dest="k", type=int, default=4,
                        help="draft length of the draft model in the main table")
    parser.add_argument("--prompt-lookup-k", type=int, default=8)
    parser.add_argument("--sweep-k", default="1,2,4,8", help="k values for the speed-up vs k plot ('' skips)")
    parser.add_argument("--draft-model", default=None,
                        help="draft checkpoint with the target's tokenizer, or int8 / int4 (the target quantized); "
                             "default: a shallow draft of --draft-layers")
    parser.add_argument("--draft-layers", default="0-7,18-29")
    parser.add_argument("--heads", default=None,
                        help="Medusa heads file, or a comma list to compare several (default: every committed one)")
    parser.add_argument("--tree", default="default,fitted",
                        help="Medusa candidate trees, comma list: names of medusa.TREES, fitted, fitted:N "
                             "(medusa_tree.py), dynamic:N (chosen each step from the heads' probabilities)")
    parser.add_argument("--medusa-lookup", default="0",
                        help="comma list of k: each Medusa tree also with prompt lookup's k-token continuation as one "
                             "more branch (medusa.LookupBranch; 0: the heads' tree alone)")
    parser.add_argument("--draft-vocab", default=None,
                        help="tokens the Medusa heads score, comma list (0: all; draft_vocab.py); default 16384 on a "
                             "CPU where the model has a ranking, else 0")
    parser.add_argument("--window-size", type=int, default=4)
    parser.add_argument("--ngram-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a busy CPU)")
    parser.add_argument("--linear", choices=("packed", "plain"), default="packed",
                        help="on a CPU, every Linear from weights prepacked for oneDNN (core/cpu_linear.py), for plain "
                             "decoding and every method alike, or PyTorch's default (plain)")
    parser.add_argument("--out", default=None, help="JSON results")
    parser.add_argument("--plot", default="speculative/speedup_vs_k.png")
    args = parser.parse_args(argv)
    if args.write_prompts:
        Path(args.write_prompts).write_text(json.dumps(build_prompts(args.num_prompts), indent=1) + "\n")
        print(f"wrote {args.num_prompts} ShareGPT evaluation prompts per kind to {args.write_prompts}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_target(args, packed=args.linear == "packed")  # before the shallow draft shares its layers
    model, tok = lm.model, lm.tokenizer
    packed = isinstance(model.lm_head, PackedLinear)
    draft, draft_label = load_draft(lm, args.draft_model, args.draft_layers, args.device, args.dtype)
    heads_paths = [Path(h) for h in args.heads.split(",")] if args.heads else committed_heads(lm.name)
    all_heads = [load_heads(path, model) for path in heads_paths]
    sweep = [int(k) for k in args.sweep_k.split(",") if k.strip()]
    params = SamplingParams(args.max_tokens)

    methods = {
        f"draft k={args.k}": lambda p: run_draft(model, draft, p, params, args.k),
        f"draft adaptive k<={max(8, args.k)}": lambda p: run_draft(model, draft, p, params, max(8, args.k), True),
        f"prompt lookup k={args.prompt_lookup_k}": lambda p: run_prompt_lookup(model, p, params, args.prompt_lookup_k),
        f"lookahead W={args.window_size} N={args.ngram_size}":
            lambda p: run_lookahead(model, p, params, args.window_size, args.ngram_size),
    }
    on_gpu = next(model.parameters()).is_cuda
    try:
        vocab_sizes = ([int(v) for v in args.draft_vocab.split(",")] if args.draft_vocab
                       else [default_size(lm.name, on_gpu)])
    except ValueError:
        raise UserError(f"--draft-vocab {args.draft_vocab!r}: give sizes like 0,16384") from None
    vocabs = {size: load_draft_vocab(lm.name, model.lm_head, size) for size in vocab_sizes}
    try:
        lookups = [int(k) for k in args.medusa_lookup.split(",")]
    except ValueError:
        raise UserError(f"--medusa-lookup {args.medusa_lookup!r}: give branch lengths like 0,3") from None
    for i, (path, heads) in enumerate(zip(heads_paths, all_heads)):
        kind = "" if heads.kind == "plain" else "+" + heads.kind
        for tree_name in args.tree.split(","):
            tree = tree_choices(tree_name, path)
            if isinstance(tree, DynamicTree) and heads.chained:
                print(f"skipping {tree_name} for {path.name}: chained heads take a fixed tree")
                continue
            for (size, vocab), lookup_k in itertools.product(vocabs.items(), lookups):
                name = (f"medusa{kind}, {tree_name} tree ({len(tree)})" + (f", vocab {size}" if size else "")
                        + (f" + lookup {lookup_k}" if lookup_k else ""))
                name += f" #{i + 1}" if name in methods else ""
                methods[name] = lambda p, heads=heads, tree=tree, vocab=vocab, lookup_k=lookup_k: run_medusa(
                    model, heads, p, params, tree, vocab=vocab, lookup_k=lookup_k)
    table = ["plain", *methods]
    for k in sweep:  # k values the main table already runs are not run twice
        methods.setdefault(f"draft k={k}", lambda p, k=k: run_draft(model, draft, p, params, k))
        methods.setdefault(f"prompt lookup k={k}", lambda p, k=k: run_prompt_lookup(model, p, params, k))

    prompts = load_prompts(args.prompts, args.num_prompts)
    warm = chat_prompt(tok, "Hello!")  # first calls pay for allocations and kernel selection: not measured
    speculative_generate(model, warm, params)
    for run in methods.values():
        run(warm)
    runs: dict[str, dict[str, list[dict]]] = {kind: {"plain": [], **{m: [] for m in methods}} for kind in prompts}
    work = [(kind, text) for kind, texts in prompts.items() for text in texts]
    for kind, text in tqdm(work, desc="prompts"):
        ids = chat_prompt(tok, text)
        plain = speculative_generate(model, ids, params)
        runs[kind]["plain"].append({"decode_s": plain.decode_s, "tokens": len(plain.tokens) - 1,
                                    "stats": plain.stats, "identical": True})
        for name, run in methods.items():
            result = run(ids)
            runs[kind][name].append({"decode_s": result.decode_s, "tokens": len(result.tokens) - 1,
                                     "stats": result.stats, "identical": result.tokens == plain.tokens})

    report = {"model": lm.label, "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
              "linear": "oneDNN packed" if packed else "F.linear",
              "draft": draft_label, "heads": [str(p) for p in heads_paths] if all_heads else None,
              "heads_draft_vocab": vocab_sizes,
              "max_tokens": args.max_tokens, "num_prompts_per_kind": args.num_prompts,
              "prompts": "ShareGPT evaluation split", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine_info(), "results": {}}
    for kind in prompts:
        plain_runs = runs[kind]["plain"]
        plain_s, plain_tokens = sum(r["decode_s"] for r in plain_runs), sum(r["tokens"] for r in plain_runs)
        report["results"][kind] = {name: summarise(rs, plain_s, plain_tokens) for name, rs in runs[kind].items()}

    print(f"\n{lm.label}, batch 1, greedy, {args.max_tokens} new tokens, {args.num_prompts} ShareGPT evaluation "
          f"prompts per kind, {torch.get_num_threads()} thread(s), {report['linear']} Linear; {draft_label}")
    head = f"{'kind':<6}{'method':<60}{'tok/s':>8}{'speed-up':>9}{'tok/pass':>9}{'same':>6}  acceptance per position"
    print(head + "\n" + "-" * len(head))
    for kind, res in report["results"].items():
        for name in table:
            r = res[name]
            acc = " ".join(f"{a:.2f}" for a in r["acceptance_rate_per_pos"][:8])
            print(f"{kind:<6}{name:<60}{r['output_throughput']:>8.1f}{r['speedup']:>8.2f}x"
                  f"{r['mean_accepted_tokens_per_step']:>9.2f}{'yes' if r['identical_to_plain'] else 'NO':>6}  {acc}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"JSON: {args.out}")
    if sweep:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.8))
        for kind, res in report["results"].items():
            for method, style in [("draft", "--"), ("prompt lookup", "-")]:
                ys = [res[f"{method} k={k}"]["speedup"] for k in sweep]
                ax.plot(sweep, ys, style, marker="o", label=f"{method}, {kind}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("k (draft tokens per step)")
        ax.set_ylabel("speed-up over plain decoding")
        ax.set_title(f"{lm.name}, {report['device']}, batch 1", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    speedups = {f"{kind}/{name}": r["speedup"] for kind, res in report["results"].items() for name, r in res.items()}
    best = max(speedups, key=speedups.get)
    print(f"best: {best} {speedups[best]:.2f}x (median over kinds of the best method: "
          f"{statistics.median(max(r['speedup'] for r in res.values()) for res in report['results'].values()):.2f}x)")


if __name__ == "__main__":
    main()
