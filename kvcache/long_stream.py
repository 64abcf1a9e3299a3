"""Perplexity over a long stream for each cache policy at an equal budget, with the cache's memory over time
(the StreamingLLM paper's Figures 1 and 3, on our model and the evaluation split of ShareGPT).

The stream is fed in chunks (default 64 tokens): one forward pass per chunk, causal inside the chunk, evicting
between chunks. For the window and StreamingLLM caches the masks make this exactly the token-by-token result (every
query sees the sinks and its own `recent` latest tokens; tests/test_kvcache_policies.py checks chunked against
token-by-token); H2O cuts its cache to budget - chunk before each chunk, so no query sees more than `budget` keys.

The reference is the dense model inside its trained context: every token scored with recomputation over a window
of `--reference-window` tokens (stride half of it), so each token has at least half a window of context.

    python -m kvcache.long_stream                    # 2560 tokens, budget 512 (20%), all policies
    python -m kvcache.long_stream --num-tokens 20480 --budget 1024 --policies full,window,streaming,h2o

On a machine without the ShareGPT package (the GPU machine), save the stream's token ids here first and pass them:
    python -m kvcache.long_stream --num-tokens 32768 --save-stream kvcache/results/stream_32768.json
    python -m kvcache.long_stream --device cuda --stream-file kvcache/results/stream_32768.json ...
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.__main__ import add_model_args
from core.data import plain_text
from core.errors import UserError, cli
from core.loading import load_model
from kvcache.policies import POLICIES, make_cache


def stream_tokens(tokenizer, num_tokens: int, split: str = "evaluation") -> torch.Tensor:
    """The first `num_tokens` tokens of the split's conversations concatenated into one text, as ids [num_tokens]."""
    ids = tokenizer(plain_text(split, max_chars=num_tokens * 8)).input_ids
    if len(ids) < num_tokens:
        raise UserError(f"the {split} split has only {len(ids)} tokens in its text, {num_tokens} asked for")
    return torch.tensor(ids[:num_tokens])


@torch.inference_mode()
def stream_nll(model, ids: torch.Tensor, cache, chunk_size: int, desc: str = "") -> tuple[list[float], list[dict]]:
    """Feed ids [N] through `cache` in chunks. Returns the NLL (nats) of tokens 1..N-1 given everything the cache
    let the model see, and the cache's size after each chunk ([{"position", "kv_tokens", "kv_bytes"}])."""
    device = next(model.parameters()).device
    nll, memory = [], []
    for start in tqdm(range(0, len(ids) - 1, chunk_size), desc=desc, leave=False):
        end = min(start + chunk_size, len(ids) - 1)
        chunk = ids[start:end].to(device)[None]
        logits = model(chunk, torch.arange(start, end, device=device)[None], cache)[0]
        nll += F.cross_entropy(logits.float(), ids[start + 1:end + 1].to(device), reduction="none").tolist()
        used = getattr(cache, "used_nbytes", cache.nbytes)()
        memory.append({"position": end, "kv_bytes": used})
    return nll, memory


@torch.inference_mode()
def recompute_nll(model, ids: torch.Tensor, window: int, desc: str = "reference") -> list[float]:
    """NLL of tokens 1..N-1, each scored by the dense model over at most `window` tokens (half a window at least
    after the first), recomputed from scratch for every window: the in-context reference."""
    device = next(model.parameters()).device
    stride, nll = window // 2, []
    for begin in tqdm(range(0, len(ids) - 1, stride), desc=desc, leave=False):
        end = min(begin + window, len(ids))
        logits = model(ids[begin:end].to(device)[None])[0, :-1].float()
        targets = ids[begin + 1:end].to(device)
        new = end - 1 - len(nll)  # targets not scored by the previous window
        nll += F.cross_entropy(logits[-new:], targets[-new:], reduction="none").tolist()
        if end == len(ids):
            break
    return nll


def load_stream(path: str, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` token ids [num_tokens] of a JSON list written by --save-stream."""
    try:
        with open(path) as f:
            ids = json.load(f)["token_ids"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read token ids from {path}: {e}") from None
    if len(ids) < num_tokens:
        raise UserError(f"{path} holds {len(ids)} tokens, {num_tokens} asked for")
    return torch.tensor(ids[:num_tokens])


def ppl(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll)) if nll else float("nan")


def plot(results: dict, out_dir: Path, bin_size: int, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = results["config"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results["policies"].items():
        nll = r["nll"]
        xs = [min(i + bin_size, len(nll)) for i in range(0, len(nll), bin_size)]
        ax.plot(xs, [ppl(nll[i:i + bin_size]) for i in range(0, len(nll), bin_size)], label=name)
    ax.axvline(cfg["budget"], color="gray", ls=":", lw=1)
    if cfg["num_tokens"] > cfg["max_position_embeddings"]:
        ax.axvline(cfg["max_position_embeddings"], color="red", ls=":", lw=1, label="trained context")
    ax.set(xlabel="position in stream (tokens)", ylabel=f"perplexity (bins of {bin_size} tokens)", yscale="log",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ppl_png = out_dir / "long_stream_ppl.png"
    fig.savefig(ppl_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results["policies"].items():
        if r["memory"]:
            ax.plot([m["position"] for m in r["memory"]], [m["kv_bytes"] / 2**20 for m in r["memory"]], label=name)
    ax.set(xlabel="position in stream (tokens)", ylabel="KV cache (MiB)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    mem_png = out_dir / "long_stream_memory.png"
    fig.savefig(mem_png, dpi=120)
    plt.close(fig)
    return [str(ppl_png), str(mem_png)]


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--num-tokens", type=int, default=2560, help="length of the stream (tokens)")
    parser.add_argument("--policies", default="full,window,streaming,h2o,int8",
                        help=f"comma-separated, from {', '.join(POLICIES)}")
    parser.add_argument("--budget", type=int, default=512, help="KV tokens a query may attend over (evicting caches)")
    parser.add_argument("--sinks", type=int, default=4, help="StreamingLLM attention sinks")
    parser.add_argument("--chunk-size", type=int, default=64, help="tokens per forward pass")
    parser.add_argument("--reference-window", type=int, default=None,
                        help="dense recompute window (default: 2 x budget; 0: skip)")
    parser.add_argument("--split", default="evaluation")
    parser.add_argument("--stream-file", help="read the stream's token ids from this JSON (see --save-stream)")
    parser.add_argument("--save-stream", help="write the stream's token ids to this JSON file and exit")
    parser.add_argument("--bin-size", type=int, default=256, help="tokens per point of the perplexity plot")
    parser.add_argument("--plot-dir", default="kvcache/results", help="where the PNG plots go")
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            raise UserError(f"unknown cache policy {p!r} (choose from {', '.join(POLICIES)})")
    if args.num_tokens < 2 or args.chunk_size < 1 or args.budget < 2:
        raise UserError("--num-tokens and --budget need at least 2, --chunk-size at least 1")
    if "h2o" in policies and args.chunk_size > args.budget // 2:
        raise UserError(f"H2O needs --chunk-size <= half the budget ({args.budget // 2})")

    if args.reference_window is None:
        args.reference_window = 2 * args.budget
    lm = load_model(args.model, args.device, args.dtype, args.random_weights)
    model, cfg = lm.model, lm.model.config
    if args.stream_file:
        ids = load_stream(args.stream_file, args.num_tokens)
    else:
        ids = stream_tokens(lm.tokenizer, args.num_tokens, args.split)
    if args.save_stream:
        with open(args.save_stream, "w") as f:
            json.dump({"split": args.split, "tokenizer": lm.name, "token_ids": ids.tolist()}, f)
        print(f"wrote {len(ids)} token ids of the {args.split} split to {args.save_stream}")
        return
    results = {"model": lm.label, "config": {**vars(args), "max_position_embeddings": cfg.max_position_embeddings},
               "policies": {}}
    if args.reference_window:
        t0 = time.perf_counter()
        nll = recompute_nll(model, ids, args.reference_window)
        results["policies"][f"dense recompute ({args.reference_window})"] = {
            "nll": nll, "memory": [], "time_s": time.perf_counter() - t0, "reference": True}
    for name in policies:
        cache = make_cache(name, model, budget=args.budget, sinks=args.sinks, max_len=args.num_tokens)
        t0 = time.perf_counter()
        nll, memory = stream_nll(model, ids, cache, args.chunk_size, desc=name)
        results["policies"][name] = {"nll": nll, "memory": memory, "time_s": time.perf_counter() - t0}

    ref = next((r for r in results["policies"].values() if r.get("reference")), None)
    ctx = cfg.max_position_embeddings
    print(f"\n{lm.label}; {args.split} split of ShareGPT, {args.num_tokens} tokens; budget {args.budget} "
          f"(StreamingLLM {args.sinks} sinks + {args.budget - args.sinks} recent); chunks of {args.chunk_size}")
    print(f"{'policy':<24} {'ppl all':>8} {'ppl <ctx':>8} {'ppl >budget':>11} {'ppl >ctx':>8} {'vs ref':>7} "
          f"{'peak KV MiB':>11} {'time s':>7}")
    for name, r in results["policies"].items():
        nll = r["nll"]
        r["ppl"], r["ppl_after_budget"] = ppl(nll), ppl(nll[args.budget:])
        r["ppl_within_context"], r["ppl_beyond_context"] = ppl(nll[:ctx]), ppl(nll[ctx:])
        r["ppl_ratio_to_reference"] = r["ppl"] / ref["ppl"] if ref else None
        r["peak_kv_bytes"] = max((m["kv_bytes"] for m in r["memory"]), default=0)
        ratio = f"{r['ppl_ratio_to_reference']:.3f}" if ref else "-"
        print(f"{name:<24} {r['ppl']:>8.2f} {r['ppl_within_context']:>8.2f} {r['ppl_after_budget']:>11.2f} {r['ppl_beyond_context']:>8.2f} "
              f"{ratio:>7} {r['peak_kv_bytes'] / 2**20:>11.1f} {r['time_s']:>7.0f}")
    results["plots"] = plot(results, Path(args.plot_dir), args.bin_size,
                            f"{lm.name}, {args.num_tokens} tokens, budget {args.budget}")
    print("plots: " + ", ".join(results["plots"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
