"""Choose a Medusa candidate tree from the heads' measured guesses instead of by hand.

A tree node is a path of ranks, (0, 2) = head 1's best token then head 2's third best. On a position where the
target's own continuation is x1, x2, ..., node (r1, .., rd) is accepted exactly when x_j is head j's r_j-th guess
for every j <= d; the tokens a pass gains are the accepted nodes (they form one path from the root). So over
recorded positions the expected gain of a tree is the sum of its nodes' hit counts / positions, and since a node
never hits more often than its parent, the best tree of n nodes is simply the n most-hit rank paths.

This script lets the model answer held-out training-split prompts greedily (as train_medusa does), records for
every position the rank of each true future token among each head's top guesses, and prints the expected tokens
per pass of the best tree of each size next to the hand-made TREES; it writes the chosen tree beside the heads
(<heads>.tree.json: the chosen size and the hit counts of the most-hit paths, so that a tree of any size can be
rebuilt: "fitted" or "fitted:N" for medusa.py and benchmark.py), plus a PNG of tokens per pass vs tree size. For
heads that guess independently it also replays medusa.DynamicTree ("dynamic:N") on the same positions, from the
heads' probabilities of their guesses.

    python -m speculative.medusa_tree                          # CPU: about two minutes
    python -m speculative.medusa_tree --device cuda --dtype float32 --prompts-file .device-kit/medusa_prompts.json \\
        --num-prompts 400 --gen-len 256 --gen-batch-size 200
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.loading import load_model

MAX_RANK = 10  # a head's guesses considered for the tree: deeper ranks are hit too rarely to earn a node
MAX_PATHS = 256  # paths recorded beside the heads: the largest tree load_fitted_tree can rebuild


def tree_path(heads_path: str | Path) -> Path:
    return Path(str(heads_path) + ".tree.json")


def load_fitted_tree(heads_path: str | Path, size: int | None = None) -> list[tuple[int, ...]]:
    """The fitted tree of the heads: of the size it was written with, or the best of `size` nodes from the hit
    counts recorded beside it."""
    path = tree_path(heads_path)
    if not path.exists():
        raise UserError(f"no fitted tree at {path}: make one with python -m speculative.medusa_tree")
    record = json.loads(path.read_text())
    counts = Counter({tuple(c): n for c, n in record["paths"]})
    size = size or record["size"]
    if size > len(counts):
        raise UserError(f"{path} records {len(counts)} paths, fewer than a tree of {size}")
    return best_tree(counts, size)


@torch.no_grad()
def guess_ranks(heads, lm_head, embed, hidden: torch.Tensor, nexts: torch.Tensor, targets: torch.Tensor,
                chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(long [N, K], [N, K, MAX_RANK]): the rank of each head's true token among its MAX_RANK best guesses, -1 if
    not among them (or if the answer ends before that token); and the head's probabilities of those guesses."""
    from speculative.train_medusa import teacher_forced_logits

    ranks, probs = [], []
    for i in range(0, len(hidden), chunk):
        y = targets[i:i + chunk]
        top = teacher_forced_logits(heads, lm_head, embed, hidden[i:i + chunk].float(), nexts[i:i + chunk],
                                    y).float().softmax(-1).topk(MAX_RANK, dim=-1)
        hit = top.indices == y[..., None]  # [n, K, MAX_RANK]
        ranks.append(torch.where(hit.any(-1), hit.float().argmax(-1), -1))
        probs.append(top.values)
    return torch.cat(ranks).cpu(), torch.cat(probs).cpu()


def path_counts(ranks: torch.Tensor) -> Counter:
    """How many positions accept each rank path: every prefix of a position's ranks up to its first miss."""
    counts: Counter = Counter()
    for row in ranks.tolist():
        path: tuple[int, ...] = ()
        for r in row:
            if r < 0:
                break
            path += (r,)
            counts[path] += 1
    return counts


def best_tree(counts: Counter, size: int) -> list[tuple[int, ...]]:
    """The `size` most-hit paths, the chain of best guesses first (as TREES list it) and parents before children:
    ties in count are broken by depth, so a parent (never less hit than its child) always comes first."""
    ranked = sorted(counts, key=lambda c: (-counts[c], len(c), c))[:size]
    chain = sorted((c for c in ranked if not any(c)), key=len)  # (0,), (0, 0), ...
    rest = sorted((c for c in ranked if any(c)), key=lambda c: (len(c), -counts[c], c))
    return chain + rest


def expected_tokens(counts: Counter, tree: list[tuple[int, ...]], positions: int) -> float:
    """Tokens per pass (accepted nodes + the target's own token) over the recorded positions."""
    return 1 + sum(counts.get(c, 0) for c in tree) / positions


def dynamic_expected_tokens(ranks: torch.Tensor, probs: torch.Tensor, sizes: list[int]) -> dict[int, float]:
    """Tokens per pass of medusa.DynamicTree of each size over the recorded positions. It picks paths best first,
    so at each position the tree of n nodes is the first n paths of the largest: one choice serves every size."""
    from speculative.medusa import DynamicTree

    largest, gained = DynamicTree(max(sizes)), Counter()
    for true, p in zip(ranks.tolist(), probs.tolist()):
        deepest = [0]  # deepest accepted node among the first n paths, n = 0, 1, ...
        for path in largest.choose(p):
            deepest.append(max(deepest[-1], len(path) if list(path) == true[:len(path)] else 0))
        for size in sizes:
            gained[size] += deepest[size]
    return {size: 1 + gained[size] / len(ranks) for size in sizes}


@cli
def main(argv: list[str] | None = None) -> None:
    from speculative.medusa import TREES, committed_heads, load_heads
    from speculative.train_medusa import head_batches, read_prompts, self_distillation_data, training_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--heads", default=None, help="heads file (default: the first committed one)")
    parser.add_argument("--num-prompts", type=int, default=48,
                        help="the training split's first prompts, which train_medusa holds out (its first 10%%)")
    parser.add_argument("--prompts-file", default=None, help="token-id prompts from train_medusa --export-prompts")
    parser.add_argument("--gen-len", type=int, default=96)
    parser.add_argument("--gen-batch-size", type=int, default=16)
    parser.add_argument("--max-input-len", type=int, default=192)
    parser.add_argument("--size", type=int, default=48, help="nodes of the tree written beside the heads")
    parser.add_argument("--sizes", default="4,8,12,19,24,32,48,64,96,128", help="tree sizes for the table and plot")
    parser.add_argument("--no-write", action="store_true", help="print only; keep the heads' tree file as it is")
    parser.add_argument("--plot", default=None, help="PNG (default: beside the heads, <heads>.tree.png)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    model = lm.model
    heads_path = Path(args.heads) if args.heads else next(iter(committed_heads(lm.name)), None)
    if heads_path is None:
        raise UserError(f"no committed Medusa heads for {lm.name}: pass --heads")
    heads = load_heads(heads_path, model)
    if args.prompts_file:
        prompts = read_prompts(args.prompts_file, lm.name, args.num_prompts, model.config.vocab_size)
    else:
        prompts = training_prompts(lm.tokenizer, args.num_prompts, args.max_input_len)
    device = next(model.parameters()).device
    data = self_distillation_data(model, prompts, args.gen_len, args.gen_batch_size, device.type == "cuda")
    hidden, nexts, targets = head_batches(data, len(heads.blocks))
    ranks, probs = guess_ranks(heads, model.lm_head, model.embed_tokens.weight, hidden, nexts, targets)
    counts, n = path_counts(ranks), len(ranks)

    sizes = sorted({int(s) for s in args.sizes.split(",")} | {args.size})
    if max(sizes) > MAX_PATHS:
        raise UserError(f"trees of at most {MAX_PATHS} nodes")
    curve = {size: expected_tokens(counts, best_tree(counts, size), n) for size in sizes}
    # Chained heads' later guesses depend on the path chosen before them: no dynamic tree (medusa.DynamicTree)
    dynamic = None if heads.chained else dynamic_expected_tokens(ranks, probs, sizes)
    hand = {name: expected_tokens(counts, tree, n) for name, tree in TREES.items()}
    chosen = best_tree(counts, args.size)
    print(f"\n{lm.label}; heads {heads_path.name}; {len(prompts)} held-out training-split prompts, {n} positions "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"{'tree':<16}{'nodes':>6}{'tokens/pass':>13}")
    for name, value in hand.items():
        print(f"{name + ' (hand)':<16}{len(TREES[name]):>6}{value:>13.3f}")
    for name, values in (("fitted", curve), ("dynamic", dynamic or {})):
        for size, value in values.items():
            print(f"{name:<16}{size:>6}{value:>13.3f}")
    print("fitted tree of", args.size, "nodes:", " ".join("".join(map(str, c)) for c in chosen))

    if not args.no_write:
        command = "python -m speculative.medusa_tree " + shlex.join(argv if argv is not None else sys.argv[1:])
        record = {"heads": heads_path.name, "model": lm.label, "num_prompts": len(prompts), "positions": n,
                  "gen_len": args.gen_len, "prompts": "training split, held out from the heads' training",
                  "command": command, "size": args.size,
                  "expected_tokens_per_pass": {str(k): v for k, v in curve.items()}, "hand_trees": hand,
                  "dynamic_expected_tokens_per_pass": dynamic and {str(k): v for k, v in dynamic.items()},
                  # every path a tree of up to MAX_PATHS nodes could use, with its hits: any size can be rebuilt
                  "paths": [[list(c), counts[c]] for c in best_tree(counts, min(MAX_PATHS, len(counts)))]}
        tree_path(heads_path).write_text(json.dumps(record) + "\n")
        print(f"tree: {tree_path(heads_path)}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(list(curve), list(curve.values()), marker="o", label="fitted (most-hit paths)")
    if dynamic:
        ax.plot(list(dynamic), list(dynamic.values()), marker="s", label="dynamic (likeliest paths each step)")
    ax.scatter([len(t) for t in TREES.values()], list(hand.values()), color="C2", zorder=3, label="hand-made TREES")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree nodes (tokens verified per pass)")
    ax.set_ylabel("expected tokens per pass")
    ax.set_title(f"Medusa trees for {heads_path.name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = Path(args.plot or str(heads_path) + ".tree.png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=120)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
