"""Pipeline parallelism: contiguous layers per rank (a stage), micro-batches flowing through with point-to-point sends.

Stage 0 embeds the tokens and runs its layers, each next stage receives the hidden states [b, T, hidden], and the
last stage applies the final norm and LM head, picks the next tokens and sends them back to stage 0. One micro-batch
alone would keep just one stage busy at a time; with M >= S micro-batches, stage 0 already decodes micro-batch 1
while stage 1 finishes micro-batch 0. Every stage records its busy intervals, and the run ends with a text timeline
and the bubble fraction (the share of stage-time spent waiting).

    torchrun --nproc-per-node 2 -m parallelism.pipeline_parallel --num-microbatches 2          # CPU, gloo
    torchrun --nproc-per-node 4 -m parallelism.pipeline_parallel --device cuda --model llama2-13b --random-weights
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn

from core.__main__ import add_model_args
from core.errors import UserError, cli
from core.generate import SamplingParams, chat_prompt, left_pad, sample
from core.kv_cache import StaticKVCache
from core.loading import load_model, load_tokenizer, resolve_dtype
from core.measure import gpu_peak_mb, peak_rss_mb
from core.model import Transformer
from core.registry import REGISTRY
from parallelism.comm import init_distributed, rank_zero_first, sync
from parallelism.tensor_parallel import split_evenly, table


class PipelineStage(nn.Module):
    """Layers [start, end) of a model; the first stage also embeds, the last also normalises and projects to logits."""

    def __init__(self, model: Transformer, rank: int, world: int):
        super().__init__()
        cfg = model.config
        if world > cfg.num_layers:
            raise UserError(f"{world} stages > {cfg.num_layers} layers: every stage needs at least one layer")
        self.start, self.end = split_evenly(cfg.num_layers, world, rank)
        self.first, self.last = rank == 0, rank == world - 1
        self.model = model  # for rope(); the layers other stages own are dropped below
        self.layers = nn.ModuleList(model.layers[self.start:self.end])
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i  # index into this stage's own KV cache
        model.layers = nn.ModuleList()
        self.embed_tokens = model.embed_tokens if self.first else None
        self.norm = model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None  # tied: the last stage keeps a copy of the embedding
        if not self.first and not (self.last and model.lm_head.weight is model.embed_tokens.weight):
            model.embed_tokens = None

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        cfg, p = self.model.config, next(self.layers.parameters())
        return StaticKVCache(len(self.layers), batch, max_len, cfg.num_kv_heads, cfg.head_dim, p.dtype, p.device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """x: token ids [b, T] (first stage) or hidden states [b, T, hidden]; returns hidden states, or on the last
        stage the logits of the last position [b, vocab]."""
        if self.first:
            x = self.embed_tokens(x)
        cos, sin = self.model.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache)
        return self.lm_head(self.norm(x[:, -1])) if self.last else x


@torch.inference_mode()
def pipeline_generate(stage: PipelineStage, prompts: list[list[int]], params: SamplingParams,
                      num_microbatches: int, device: torch.device) -> dict:
    """Run the pipeline schedule on this rank: for each step (0 = prefill), for each micro-batch, receive, compute,
    send. Sends are asynchronous (isend) so a stage never waits for its neighbour to be ready to receive.

    Every rank calls it with the same prompts. Returns this rank's busy intervals [(start_s, end_s, step, mb)] and
    send/receive wait; the last stage also returns tokens [B][max_tokens] (cut after a stop token, as
    core.generate does) and logits [steps, B, vocab].
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if not 1 <= num_microbatches <= len(prompts):
        raise UserError(f"--num-microbatches must be between 1 and the batch size {len(prompts)}")
    bounds = [split_evenly(len(prompts), num_microbatches, m) for m in range(num_microbatches)]
    groups = [prompts[lo:hi] for lo, hi in bounds]
    ids, pos = zip(*(left_pad(g, device) for g in groups))
    caches = [stage.new_cache(len(g), ids[m].shape[1] + params.max_tokens) for m, g in enumerate(groups)]
    hidden = stage.model.config.hidden_size
    dtype = next(stage.layers.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    tokens: list[list[torch.Tensor]] = [[] for _ in groups]
    step_logits: list[list[torch.Tensor]] = [[] for _ in range(params.max_tokens)]
    pending, busy = [], []
    wait_s = 0.0
    dist.barrier()
    t_origin = time.perf_counter()
    for step in range(params.max_tokens):
        for m in range(num_microbatches):
            positions = pos[m] if step == 0 else pos[m][:, -1:] + step
            b, T = positions.shape
            t0 = time.perf_counter()
            if stage.first:
                if step == 0:
                    x = ids[m]
                elif world == 1:
                    x = tokens[m][-1][:, None]
                else:
                    x = torch.empty(b, 1, dtype=torch.long, device=device)
                    dist.recv(x, prv)  # the tokens the last stage just picked for this micro-batch
            else:
                x = torch.empty(b, T, hidden, dtype=dtype, device=device)
                dist.recv(x, prv)
            sync(device)
            t1 = time.perf_counter()
            wait_s += t1 - t0
            y = stage(x, positions, caches[m])
            if stage.last:
                step_logits[step].append(y.float().cpu())
                y = sample(y, params, gen)
                tokens[m].append(y)
            sync(device)
            busy.append((t1 - t_origin, time.perf_counter() - t_origin, step, m))
            if world > 1 and not (stage.last and step == params.max_tokens - 1):
                pending.append(dist.isend(y.contiguous(), nxt))  # the list keeps the tensor alive until sent
    t0 = time.perf_counter()
    for work in pending:
        work.wait()
    wait_s += time.perf_counter() - t0
    out = {"rank": rank, "busy": busy, "wait_s": wait_s, "layers": [stage.start, stage.end],
           "span_s": time.perf_counter() - t_origin}
    if stage.last:
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(stage.model.config.eos_ids))
        rows = [row for m in range(num_microbatches) for row in torch.stack(tokens[m], 1).tolist()]
        out["tokens"] = [row[:next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]
        out["logits"] = torch.stack([torch.cat(s) for s in step_logits])
    return out


def bubble_fraction(timelines: list[list[tuple]]) -> float:
    """1 - (busy stage-seconds) / (stages x span of the whole run): the share of stage-time spent idle."""
    start = min(t[0] for tl in timelines for t in tl)
    end = max(t[1] for tl in timelines for t in tl)
    busy = sum(t[1] - t[0] for tl in timelines for t in tl)
    return 1 - busy / (len(timelines) * (end - start))


def render_timeline(timelines: list[list[tuple]], width: int = 100, steps: int | None = None) -> str:
    """One text row per stage: a letter per micro-batch while busy (upper case in prefill), '.' while idle.

    `steps` limits the picture to the first steps (prefill and early decode) so single intervals stay visible.
    """
    if steps is not None:
        timelines = [[t for t in tl if t[2] < steps] for tl in timelines]
    start = min(t[0] for tl in timelines for t in tl)
    end = max(t[1] for tl in timelines for t in tl)
    scale = width / (end - start)
    rows = []
    for s, tl in enumerate(timelines):
        row = ["."] * width
        for a, b, step, m in tl:
            ch = chr((ord("A") if step == 0 else ord("a")) + m % 26)
            for c in range(int((a - start) * scale), max(int((b - start) * scale), int((a - start) * scale) + 1)):
                row[min(c, width - 1)] = ch
        rows.append(f"stage {s} |{''.join(row)}|")
    return "\n".join(rows) + f"\n{'':8}0 ms{'':{max(width - 12, 1)}}{(end - start) * 1e3:.0f} ms"


def build_stage_random(name: str, rank: int, world: int, device: torch.device,
                       dtype: torch.dtype, seed: int = 0) -> tuple[PipelineStage, str]:
    """This rank's stage of a registered shape with random weights, never allocating the other stages' layers
    (Llama-2-70B over 8 GPUs): built on the meta device, cut to the stage, then only the stage is allocated."""
    if name not in REGISTRY:
        raise UserError(f"--random-weights with pipeline parallelism needs a registered shape, not {name!r}")
    cfg = REGISTRY[name].config
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            stage = PipelineStage(Transformer(cfg), rank, world)
        stage = stage.to_empty(device=device)
    finally:
        torch.set_default_dtype(previous)
    if stage.last and cfg.tie_word_embeddings:  # to_empty allocates the two names of a tied weight separately
        stage.lm_head.weight = stage.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(seed + rank)
    with torch.no_grad():
        for pname, p in stage.named_parameters():
            p.fill_(1.0) if "norm" in pname else p.normal_(0.0, 0.02, generator=gen)
    return stage.eval(), f"{name} [RANDOM weights (speed only), {str(dtype).removeprefix('torch.')}, {device.type}]"


def plot_timeline(timelines: list[list[tuple]], path: str, title: str) -> None:
    """The stage timeline as a Gantt chart PNG: one row per stage, one colour per micro-batch, prefill hatched."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(t[0] for tl in timelines for t in tl)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(timelines)))
    for s, tl in enumerate(timelines):
        for a, b, step, m in tl:
            ax.barh(s, (b - a) * 1e3, left=(a - start) * 1e3, color=colours(m % 10), hatch="//" if step == 0 else None,
                    edgecolor="black" if step == 0 else None, linewidth=0.3)
    ax.set_yticks(range(len(timelines)), [f"stage {s}" for s in range(len(timelines))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (hatched: prefill; colour: micro-batch; white: idle)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pp_generate(name: str, prompts: list[list[int]], max_tokens: int, num_microbatches: int = 1,
                device: str = "cpu", dtype: str | None = "float32", random_weights: bool = False) -> dict:
    """One rank's work: load, keep this stage's layers, run the schedule. Call inside a process group."""
    rank, world, dev = init_distributed(device)
    if random_weights and world > 1:
        stage, label = build_stage_random(name, rank, world, dev, resolve_dtype(dtype, dev))
    else:
        lm = load_model(name, str(dev), dtype, random_weights)
        stage, label = PipelineStage(lm.model, rank, world), lm.label
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sync(dev)
    t0 = time.perf_counter()
    out = pipeline_generate(stage, prompts, params, num_microbatches, dev)
    out.update(label=label, elapsed_s=time.perf_counter() - t0,
               peak_mb=gpu_peak_mb(dev) if dev.type == "cuda" else peak_rss_mb())
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    parser.add_argument("--batch-size", type=int, default=4, help="copies of the prompt, split into micro-batches")
    parser.add_argument("--num-microbatches", type=int, default=None, help="default: the number of stages")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeline-steps", type=int, default=3, help="steps shown in the zoomed timeline")
    parser.add_argument("--out", help="write the measurements as JSON")
    parser.add_argument("--plot", help="write the timeline as a PNG here")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")

    rank, world, dev = init_distributed(args.device)
    mbs = args.num_microbatches or min(world, args.batch_size)
    tokenizer = rank_zero_first(lambda: load_tokenizer(None))  # presets borrow the default model's tokenizer
    prompts = [chat_prompt(tokenizer, args.prompt)] * args.batch_size
    r = pp_generate(args.model, prompts, args.max_tokens, mbs, str(dev), args.dtype, args.random_weights)
    everyone = [None] * world
    dist.all_gather_object(everyone, {k: v for k, v in r.items() if k not in ("logits", "tokens")})
    if rank == 0:
        timelines = [e["busy"] for e in everyone]
        print(f"\n{r['label']}, pipeline parallel over {world} stage(s), {dev.type}, batch {args.batch_size} in "
              f"{mbs} micro-batch(es), {len(prompts[0])} prompt tokens, {args.max_tokens} new tokens")
        print(f"\nfirst {args.timeline_steps} steps (A.. prefill of micro-batch 0.., a.. decode, '.' idle):")
        print(render_timeline(timelines, steps=args.timeline_steps))
        print("\nwhole run:")
        print(render_timeline(timelines))
        rows = []
        for e in everyone:
            busy = sum(b - a for a, b, _, _ in e["busy"])
            rows.append((e["rank"], f"{e['layers'][0]}-{e['layers'][1] - 1}", f"{busy * 1e3:.0f}",
                         f"{e['wait_s'] * 1e3:.0f}", f"{busy / e['span_s']:.0%}", f"{e['peak_mb']:.0f}"))
        print(table(rows, ("stage", "layers", "busy_ms", "wait_ms", "utilisation", "peak_MB")))
        span = max(e["span_s"] for e in everyone)
        new_tokens = args.batch_size * args.max_tokens
        print(f"\nbubble fraction {bubble_fraction(timelines):.0%}; {new_tokens} tokens in {span:.2f} s = "
              f"{new_tokens / span:.1f} output tokens/s (prefill included)")
        if args.plot:
            plot_timeline(timelines, args.plot, f"{r['label']}: {world} stages, batch {args.batch_size} in {mbs} "
                                                f"micro-batches, bubble {bubble_fraction(timelines):.0%}")
            print(f"wrote {args.plot}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"model": r["label"], "pipeline_parallel_size": world, "num_microbatches": mbs,
                           "bubble_fraction": bubble_fraction(timelines), "output_throughput": new_tokens / span,
                           "stages": everyone}, f, indent=2)
    # The last stage holds the tokens; every rank needs them only for printing, which rank 0 does.
    if world > 1:
        dist.barrier()
    if rank == world - 1:
        print(f"text of row 0: {tokenizer.decode(r['tokens'][0])!r}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
