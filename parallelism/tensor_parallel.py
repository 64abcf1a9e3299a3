"""Tensor parallelism, Megatron style: shard every layer's matrices across ranks, one all-reduce per block.

Attention: q/k/v are column-parallel (each rank computes its own heads), o_proj is row-parallel (each rank holds the
input columns of its heads; partial outputs are summed by one all-reduce). The MLP likewise: gate/up column-parallel,
down row-parallel, one all-reduce. So a layer costs two all-reduces of [B, T, hidden] and nothing else.

The model class is unchanged: `shard_model` swaps the `nn.Linear`s in place (as gpt-fast's tp.py does) and the core
attention derives its head counts from the projections' sizes. Heads are split as evenly as the shape allows:
- ranks <= KV heads: whole KV groups per rank, uneven when they don't divide (default model, TP=2: 6 + 3 query heads);
- ranks > KV heads: query heads split evenly and each rank holds copies of the KV heads its query heads read
  (replication, e.g. the tiny model at TP=4 or the default model at TP=9).

    torchrun --nproc-per-node 3 -m parallelism.tensor_parallel                      # CPU, gloo
    torchrun --nproc-per-node 8 -m parallelism.tensor_parallel --device cuda --model llama2-70b --random-weights
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt, generate
from core.loading import load_model, load_tokenizer, resolve_dtype
from core.measure import gpu_peak_mb, peak_rss_mb
from core.model import Transformer
from core.registry import REGISTRY
from parallelism.comm import init_distributed, rank_zero_first, sync
from parallelism.planner import HARDWARE, model_config, plan


@dataclass
class CommStats:
    """Collectives issued by this rank: how many, how many bytes of payload, and the wall time spent in them."""
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    device: torch.device = torch.device("cpu")
    enabled: bool = True  # off: plain all-reduces, so a timed run is not slowed by the syncs timing needs

    def reset(self) -> None:
        self.calls, self.bytes, self.seconds = 0, 0, 0.0


def timed_all_reduce(x: torch.Tensor, stats: CommStats | None) -> torch.Tensor:
    """Sum x over all ranks in place. The time includes waiting for the slowest rank to arrive, as any sync does."""
    if stats is None or not stats.enabled:
        dist.all_reduce(x)
        return x
    sync(stats.device)
    t0 = time.perf_counter()
    dist.all_reduce(x)
    sync(stats.device)
    stats.seconds += time.perf_counter() - t0
    stats.calls += 1
    stats.bytes += x.numel() * x.element_size()
    return x


class ColumnParallelLinear(nn.Module):
    """The output rows `rows` of a full Linear: y_local = x @ W[rows].T (+ b[rows]). No communication."""

    def __init__(self, full: nn.Linear, rows: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach().index_select(0, rows).clone(), requires_grad=False)
        self.bias = (nn.Parameter(full.bias.detach().index_select(0, rows).clone(), requires_grad=False)
                     if full.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """The input columns `cols` of a full Linear; the partial products of all ranks are summed by one all-reduce."""

    def __init__(self, full: nn.Linear, cols: torch.Tensor, stats: CommStats | None):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach().index_select(1, cols).clone(), requires_grad=False)
        self.bias = nn.Parameter(full.bias.detach().clone(), requires_grad=False) if full.bias is not None else None
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = timed_all_reduce(F.linear(x, self.weight), self.stats)
        return y + self.bias if self.bias is not None else y  # the bias is added once, after the sum


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding table; tokens outside give zeros, an all-reduce fills them in."""

    def __init__(self, full: nn.Embedding, start: int, end: int, stats: CommStats | None):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[start:end].clone(), requires_grad=False)
        self.start, self.end, self.stats = start, end, stats

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)
        x = F.embedding((ids - self.start) * mine, self.weight) * mine[..., None]
        return timed_all_reduce(x, self.stats)


class VocabParallelLMHead(nn.Module):
    """Logits of vocabulary rows [start, end) on each rank, gathered so every rank holds all logits [.., vocab]."""

    def __init__(self, weight: nn.Parameter, sizes: list[int]):
        super().__init__()
        self.weight, self.sizes = weight, sizes

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight).contiguous()
        parts = [local.new_empty(*local.shape[:-1], n) for n in self.sizes]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)


def split_evenly(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's share when n items are split into `world` contiguous parts as evenly as possible."""
    return rank * n // world, (rank + 1) * n // world


def head_layout(num_heads: int, num_kv_heads: int, world: int, rank: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) this rank computes; a KV head listed twice is a replica.

    The local heads keep the grouped-query pattern: local query head i reads local KV head i // (len(q) / len(kv)).
    """
    if world > num_heads:
        raise UserError(f"{world} ranks > {num_heads} query heads: every rank needs at least one head")
    group = num_heads // num_kv_heads
    if world <= num_kv_heads:  # whole KV groups: no replication
        lo, hi = split_evenly(num_kv_heads, world, rank)
        return list(range(lo * group, hi * group)), list(range(lo, hi))
    lo, hi = split_evenly(num_heads, world, rank)
    q = list(range(lo, hi))
    runs = Counter(h // group for h in q)  # how many local query heads read each KV head (in order)
    g = math.gcd(*runs.values())  # local group size; KV head j is copied runs[j] / g times
    return q, [j for j, c in runs.items() for _ in range(c // g)]


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


@torch.no_grad()
def shard_model(model: Transformer, rank: int, world: int, vocab_parallel: bool = False,
                stats: CommStats | None = None) -> Transformer:
    """Shard a loaded model in place for `rank` of `world`; returns it. All ranks must start from the same weights.

    Afterwards `model.config` holds this rank's local head counts and intermediate size (what the KV cache is sized
    by); the vocabulary stays whole because logits are gathered.
    """
    cfg = model.config
    q_heads, kv_heads = head_layout(cfg.num_heads, cfg.num_kv_heads, world, rank)
    q_rows, kv_rows = _rows(q_heads, cfg.head_dim), _rows(kv_heads, cfg.head_dim)
    lo, hi = split_evenly(cfg.intermediate_size, world, rank)
    mlp_rows = torch.arange(lo, hi)
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        a.q_proj = ColumnParallelLinear(a.q_proj, q_rows)
        a.k_proj = ColumnParallelLinear(a.k_proj, kv_rows)
        a.v_proj = ColumnParallelLinear(a.v_proj, kv_rows)
        a.o_proj = RowParallelLinear(a.o_proj, q_rows, stats)
        m.gate_proj = ColumnParallelLinear(m.gate_proj, mlp_rows)
        m.up_proj = ColumnParallelLinear(m.up_proj, mlp_rows)
        m.down_proj = RowParallelLinear(m.down_proj, mlp_rows, stats)
    if vocab_parallel:
        sizes = [split_evenly(cfg.vocab_size, world, r)[1] - split_evenly(cfg.vocab_size, world, r)[0]
                 for r in range(world)]
        vlo, vhi = split_evenly(cfg.vocab_size, world, rank)
        tied = model.lm_head.weight is model.embed_tokens.weight
        head_weight = model.lm_head.weight
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, vlo, vhi, stats)
        shard = model.embed_tokens.weight if tied else nn.Parameter(head_weight[vlo:vhi].clone(),
                                                                    requires_grad=False)
        model.lm_head = VocabParallelLMHead(shard, sizes)
    model.config = dataclasses.replace(cfg, num_heads=len(q_heads), num_kv_heads=len(kv_heads),
                                       intermediate_size=hi - lo)
    return model


def build_sharded_random(name: str, rank: int, world: int, device: torch.device, dtype: torch.dtype,
                         vocab_parallel: bool, stats: CommStats | None, seed: int = 0) -> Transformer:
    """A registered shape with random weights, sharded without ever holding the whole model (70B on 8 GPUs).

    The model is built on the meta device (shapes only), sharded, then only the local shards are allocated.
    """
    if name not in REGISTRY:
        raise UserError(f"--random-weights with tensor parallelism needs a registered shape, not {name!r}")
    cfg = REGISTRY[name].config
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(cfg)
        shard_model(model, rank, world, vocab_parallel, stats)
        model = model.to_empty(device=device)
    finally:
        torch.set_default_dtype(previous)
    if cfg.tie_word_embeddings:  # to_empty allocates the two names of a tied weight separately
        model.lm_head.weight = model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.fill_(1.0) if "norm" in pname else p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def tp_generate(name: str, prompts: list[list[int]], max_tokens: int, vocab_parallel: bool = False,
                device: str = "cpu", dtype: str | None = "float32", random_weights: bool = False,
                measure: bool = False) -> dict:
    """One rank's work: load, shard, greedy-generate `max_tokens` tokens per prompt, report tokens, logits, timing.

    Every rank computes the same logits (the all-reduce gives each rank the full sum), so every rank samples the
    same tokens and rank 0's result is the answer. Call inside a process group (torchrun or comm.run_local).
    Returns a dict: tokens [B][max_tokens], logits [steps, B, vocab] (float32, last position of each forward),
    ttft_ms, tpot_ms. With `measure` it first runs a short warm-up, then the timed run, then a third run that
    times every all-reduce (count, bytes, seconds of prefill and per decode token).
    """
    rank, world, dev = init_distributed(device)
    stats = CommStats(device=dev, enabled=False) if measure else None
    if random_weights and world > 1:
        dt = resolve_dtype(dtype, dev)
        model = build_sharded_random(name, rank, world, dev, dt, vocab_parallel, stats)
        label = f"{name} [RANDOM weights (speed only), {str(dt).removeprefix('torch.')}, {dev.type}]"
    else:
        lm = load_model(name, str(dev), dtype, random_weights)
        label = lm.label
        model = shard_model(lm.model, rank, world, vocab_parallel, stats) if world > 1 else lm.model
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def run(tokens: int, on_token=None):
        dist.barrier()
        sync(dev)
        t0 = time.perf_counter()
        result = generate(model, prompts, SamplingParams(max_tokens=tokens, ignore_eos=True), on_token)
        sync(dev)
        return result, time.perf_counter() - t0

    if measure:
        run(2)  # warm-up: first kernels, allocator, communicator set-up
    logits: list[torch.Tensor] = []
    hook = model.register_forward_hook(lambda _m, _i, out: logits.append(out[:, -1].float().cpu()))
    result, elapsed = run(max_tokens)
    hook.remove()
    steps = len(result.token_times_s)
    decode_s = sum(result.token_times_s)
    out = {"rank": rank, "world_size": world, "label": label, "device": dev.type, "tokens": result.tokens,
           "logits": torch.stack(logits), "elapsed_s": elapsed, "ttft_ms": result.ttft_s * 1e3,
           "tpot_ms": decode_s / steps * 1e3 if steps else float("nan"), "decode_steps": steps,
           "local_heads": [model.config.num_heads, model.config.num_kv_heads],
           "local_intermediate": model.config.intermediate_size}
    if stats:
        prefill: dict[str, float] = {}

        def after_first_token(_row: int, _token: int) -> None:
            if not prefill:
                prefill.update(calls=stats.calls, bytes=stats.bytes, seconds=stats.seconds)

        stats.enabled = True
        timed, _ = run(max_tokens, after_first_token)
        stats.enabled = False
        timed_decode_s = sum(timed.token_times_s)
        decode_comm_s = stats.seconds - prefill["seconds"]
        out.update(prefill_comm_ms=prefill["seconds"] * 1e3,
                   prefill_comm_share=prefill["seconds"] / timed.ttft_s,
                   decode_allreduce_per_token=(stats.calls - prefill["calls"]) / max(steps, 1),
                   decode_allreduce_bytes_per_token=(stats.bytes - prefill["bytes"]) / max(steps, 1),
                   decode_comm_ms_per_token=decode_comm_s / max(steps, 1) * 1e3,
                   decode_comm_share=decode_comm_s / timed_decode_s if timed_decode_s else 0.0)
    out["peak_mb"] = gpu_peak_mb(dev) if dev.type == "cuda" else peak_rss_mb()
    return out


def table(rows: list[tuple], header: tuple) -> str:
    """A plain fixed-width text table."""
    rows = [tuple(str(v) for v in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def single_process_check(name: str, prompts: list[list[int]], max_tokens: int, dev: torch.device,
                         dtype: str | None, r: dict) -> str:
    """Rank 0 re-runs the unsharded model and compares greedy tokens and logits with the sharded run `r`."""
    lm = load_model(name, str(dev), dtype)
    logits: list[torch.Tensor] = []
    hook = lm.model.register_forward_hook(lambda _m, _i, out: logits.append(out[:, -1].float().cpu()))
    ref = generate(lm.model, prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    hook.remove()
    diff = (torch.stack(logits) - r["logits"]).abs().max().item()
    same = ref.tokens == r["tokens"]
    return (f"greedy tokens equal to the single-process run: {'YES' if same else 'NO'}; "
            f"max |logit difference| {diff:.2e}")


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    parser.add_argument("--input-len", type=int, help="a synthetic prompt of this many tokens instead of --prompt")
    parser.add_argument("--batch-size", type=int, default=1, help="copies of the prompt decoded together")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--vocab-parallel", action="store_true", help="shard the embedding and LM head too")
    parser.add_argument("--hardware", choices=sorted(HARDWARE),
                        help="print the planner's prediction for this GPU next to the measurement (default on CUDA: "
                             "h100-sxm)")
    parser.add_argument("--check", action="store_true",
                        help="rank 0 also runs the unsharded model and compares greedy tokens and logits")
    parser.add_argument("--out", help="write the measurements as JSON")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_tokens < 2 or (args.input_len is not None and args.input_len < 1):
        raise UserError("--batch-size and --input-len must be >= 1 and --max-tokens >= 2")
    if args.check and args.random_weights:  # sharded random weights are drawn per rank: no whole model to compare
        raise UserError("--check compares with the unsharded model's trained weights: drop --random-weights")

    rank, world, dev = init_distributed(args.device)
    tokenizer = rank_zero_first(lambda: load_tokenizer(None))  # presets borrow the default model's tokenizer
    if args.input_len:  # token ids from the middle of the vocabulary, the same on every rank
        prompt = [(1000 + 7 * i) % 30000 + 100 for i in range(args.input_len)]
    else:
        prompt = chat_prompt(tokenizer, args.prompt)
    prompts = [prompt] * args.batch_size
    r = tp_generate(args.model, prompts, args.max_tokens, args.vocab_parallel, str(dev), args.dtype,
                    args.random_weights, measure=True)
    everyone = [None] * world
    dist.all_gather_object(everyone, {k: v for k, v in r.items() if k not in ("logits", "tokens")})
    if rank == 0:
        prefill_tok_s = len(prompt) * args.batch_size / (r["ttft_ms"] / 1e3)
        print(f"\n{r['label']}, tensor parallel over {world} rank(s), {r['device']}, batch {args.batch_size}, "
              f"{len(prompt)} prompt tokens, {args.max_tokens} new tokens")
        print(table([(e["rank"], *e["local_heads"], e["local_intermediate"], f"{e['ttft_ms']:.1f}",
                      f"{e['prefill_comm_share']:.0%}", f"{e['tpot_ms']:.2f}", f"{e['decode_allreduce_per_token']:.0f}",
                      f"{e['decode_allreduce_bytes_per_token'] / 1e3:.1f}", f"{e['decode_comm_ms_per_token']:.2f}",
                      f"{e['decode_comm_share']:.0%}", f"{e['peak_mb']:.0f}") for e in everyone],
                    ("rank", "q_heads", "kv_heads", "ffn", "ttft_ms", "comm%", "tpot_ms", "allreduce/tok",
                     "KB/tok", "comm_ms/tok", "comm%", "peak_MB")))
        print(f"(comm% and comm_ms/tok come from a separate run that synchronises around every all-reduce)")
        measured = {"decode_ms_per_token": r["tpot_ms"], "prefill_tokens_per_s": prefill_tok_s,
                    "comm_ms_per_token": r["decode_comm_ms_per_token"]}
        hw_name = args.hardware or ("h100-sxm" if dev.type == "cuda" else None)
        predicted = None
        if hw_name:
            cfg = model_config(args.model)
            p = plan(cfg, world, 1, HARDWARE[hw_name], args.batch_size, len(prompt), len(prompt) + args.max_tokens // 2,
                     bytes_per_value=torch.finfo(resolve_dtype(args.dtype, dev)).bits // 8)
            predicted = {"decode_ms_per_token": p.decode_ms_per_token, "prefill_tokens_per_s": p.prefill_tokens_per_s,
                         "comm_ms_per_token": p.comm_ms_per_token}
            print(f"\nmeasured vs planner ({hw_name}, ideal):")
            print(table([(k, f"{measured[k]:,.2f}", f"{predicted[k]:,.2f}") for k in measured],
                        ("metric", "measured", "predicted")))
        print(f"\n{r['label']}: TP={world}, batch {args.batch_size}: decode {r['tpot_ms']:.2f} ms/token "
              f"({1e3 / r['tpot_ms'] * args.batch_size:.1f} output tokens/s), prefill {prefill_tok_s:,.0f} tokens/s, "
              f"all-reduce {r['decode_comm_ms_per_token']:.2f} ms/token")
        if not args.input_len:
            print(f"text of row 0: {tokenizer.decode(r['tokens'][0])!r}")
        check = single_process_check(args.model, prompts, args.max_tokens, dev, args.dtype, r) if args.check else None
        if check:
            print(check)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"model": r["label"], "tensor_parallel_size": world, "batch_size": args.batch_size,
                           "input_len": len(prompt), "max_tokens": args.max_tokens, "measured": measured,
                           "predicted": predicted, "hardware": hw_name, "check": check, "ranks": everyone},
                          f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
