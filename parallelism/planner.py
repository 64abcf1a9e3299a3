"""A communication and memory planner: what tensor and pipeline parallelism cost before you rent the GPUs.

For a model shape, a GPU count and the hardware's bandwidths it prints, for every split TP x PP = N:
weights and KV cache per GPU, how many tokens of KV cache fit, the all-reduce traffic per token, and ideal
(roofline) estimates of batch-decode latency and prefill throughput. "Ideal" means spec bandwidths, no overlap of
communication with compute, no kernel-launch overhead: a floor a measured run approaches but never beats.

The arithmetic, per decode step of a batch of B tokens (L layers, hidden size h, b bytes per value):
- TP: every layer ends its attention and its MLP with an all-reduce of [B, h] -> 2 L all-reduces, 2 L B h b bytes.
  A ring all-reduce over t ranks moves 2 (t-1)/t of the message through each link: latency + 2 (t-1)/t n / link.
- Each GPU streams its weight shard once per step: (weights / (t p)) / HBM bandwidth, plus its share of the KV cache.
- PP: a token passes the stages one after the other, so batch-1 latency is not divided by p; p - 1 point-to-point
  sends of [B, h] are added. PP buys memory (and throughput with micro-batches), not latency.
- Prefill of T tokens is compute-bound: 2 params T FLOPs, split over t GPUs (stages work one after the other).

    python -m parallelism.planner --model llama2-70b --num-gpus 8
    python -m parallelism.planner --model llama2-7b --num-gpus 1 2 4 8 --hardware a100-sxm
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from core.config import ModelConfig
from core.errors import UserError, cli
from core.registry import REGISTRY


@dataclass(frozen=True)
class Hardware:
    """One GPU and its links. Bandwidths in GB/s (1e9 bytes/s); link_gbs is per direction, per GPU."""
    name: str
    memory_gb: float
    mem_bw_gbs: float
    tflops: float  # dense bf16/fp16 tensor-core peak
    link_gbs: float
    link_latency_us: float  # fixed cost of one small collective
    source: str


HARDWARE = {h.name: h for h in [
    # 3.0 TB/s is the device-to-device copy measured on the book's H100 (spec sheet: 3.35 TB/s).
    Hardware("h100-sxm", 80, 3000, 989, 450, 15, "HBM measured 3.0 TB/s; NVLink 4 and FLOPs from the spec sheet"),
    Hardware("h200", 141, 4800, 989, 450, 15, "spec sheet"),
    Hardware("a100-sxm", 80, 2039, 312, 300, 15, "spec sheet"),
    Hardware("h100-pcie", 80, 2000, 756, 64, 30, "spec sheet; PCIe gen5 x16 between GPUs, no NVLink"),
]}


def model_config(name: str) -> ModelConfig:
    """A registered shape, or the config.json of a local Hugging Face folder."""
    if name in REGISTRY:
        return REGISTRY[name].config
    from core.loading import find_model_dir

    return ModelConfig.from_hf(json.loads((find_model_dir(name) / "config.json").read_text()))


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads a TP rank holds: its share, or one replica when there are more ranks than KV heads."""
    return max(math.ceil(cfg.num_kv_heads / tp), 1)


def ring_all_reduce_s(nbytes: float, ranks: int, hw: Hardware) -> float:
    """Time of one ring all-reduce of `nbytes` over `ranks` GPUs: a latency term plus 2 (r-1)/r of the data per link."""
    if ranks == 1:
        return 0.0
    return hw.link_latency_us * 1e-6 + 2 * (ranks - 1) / ranks * nbytes / (hw.link_gbs * 1e9)


def point_to_point_s(nbytes: float, hw: Hardware) -> float:
    return hw.link_latency_us * 1e-6 + nbytes / (hw.link_gbs * 1e9)


@dataclass
class Plan:
    """Per-GPU memory and ideal per-token costs of one TP x PP split. Sizes in bytes unless the name says."""
    tensor_parallel_size: int
    pipeline_parallel_size: int
    weights_gb_per_gpu: float
    kv_bytes_per_token_per_gpu: float
    kv_cache_tokens: int  # tokens of KV cache that fit next to the weights (0: the weights alone do not fit)
    allreduce_per_token: int  # all-reduces per decode step (per rank)
    allreduce_bytes_per_token: float  # all-reduce payload per decode step, batch included
    comm_ms_per_token: float  # TP all-reduces + PP sends per decode step
    decode_ms_per_token: float  # one decode step (latency of a token), ideal
    prefill_comm_ms: float
    prefill_tokens_per_s: float  # of one prompt of input_len tokens, ideal

    @property
    def fits(self) -> bool:
        return self.kv_cache_tokens > 0


def plan(cfg: ModelConfig, tp: int, pp: int, hw: Hardware, batch_size: int = 1, input_len: int = 512,
         context_len: int = 512, bytes_per_value: int = 2, gpu_memory_utilization: float = 0.9) -> Plan:
    """Estimate one split: `tp` ranks per stage, `pp` stages, decode at `batch_size` sequences of `context_len`
    tokens of context, prefill of one `input_len`-token prompt. The embedding and LM head are vocab-parallel
    (split over the TP ranks, as vLLM does) and live on the first and last stage."""
    if tp < 1 or pp < 1:
        raise UserError("tensor and pipeline parallel sizes must be >= 1")
    if tp > cfg.num_heads:
        raise UserError(f"tensor parallel size {tp} > {cfg.num_heads} attention heads")
    if pp > cfg.num_layers:
        raise UserError(f"pipeline parallel size {pp} > {cfg.num_layers} layers")
    h, L, b = cfg.hidden_size, cfg.num_layers, bytes_per_value
    kv_local = kv_heads_per_rank(cfg, tp) * cfg.head_dim
    q_local = cfg.num_heads * cfg.head_dim / tp
    layer_params = h * q_local * 2 + 2 * h * kv_local + 3 * h * cfg.intermediate_size / tp + 2 * h
    embed = cfg.vocab_size * h / tp
    # The first stage adds the embedding, the last the final norm and LM head (one table when tied and pp == 1).
    edge_params = (2 * embed if pp == 1 and not cfg.tie_word_embeddings else embed) + h
    layers_per_stage = math.ceil(L / pp)
    weights = (layers_per_stage * layer_params + edge_params) * b
    kv_per_token = 2 * layers_per_stage * kv_local * b
    free = hw.memory_gb * 1e9 * gpu_memory_utilization - weights
    kv_tokens = int(free // kv_per_token) if free > 0 else 0

    # Decode: all stages stream their weights one after the other for one token; the whole model's weights
    # divided by t, plus every layer's KV cache of the batch, divided by t.
    all_weights_per_tp_rank = (L * layer_params + (embed if cfg.tie_word_embeddings else 2 * embed) + h) * b
    kv_read = batch_size * context_len * 2 * L * kv_local * b
    memory_s = (all_weights_per_tp_rank + kv_read) / (hw.mem_bw_gbs * 1e9)
    message = batch_size * h * b
    comm_s = 2 * L * ring_all_reduce_s(message, tp, hw) + (pp - 1) * point_to_point_s(message, hw)
    # Prefill: compute-bound; the same communication with T tokens per message.
    flops = 2 * cfg.num_params() * input_len
    compute_s = max(flops / (tp * hw.tflops * 1e12), all_weights_per_tp_rank / (hw.mem_bw_gbs * 1e9))
    prefill_message = input_len * h * b
    prefill_comm_s = (2 * L * ring_all_reduce_s(prefill_message, tp, hw)
                      + (pp - 1) * point_to_point_s(prefill_message, hw))
    return Plan(tp, pp, weights / 1e9, kv_per_token, kv_tokens, 2 * L if tp > 1 else 0,
                2 * L * message if tp > 1 else 0.0, comm_s * 1e3, (memory_s + comm_s) * 1e3,
                prefill_comm_s * 1e3, input_len / (compute_s + prefill_comm_s))


def splits(num_gpus: int, cfg: ModelConfig) -> list[tuple[int, int]]:
    """Every (tp, pp) with tp * pp = num_gpus that the shape allows, TP-heaviest first."""
    return [(t, num_gpus // t) for t in range(num_gpus, 0, -1)
            if num_gpus % t == 0 and t <= cfg.num_heads and num_gpus // t <= cfg.num_layers]


def plan_table(plans: list[Plan]) -> str:
    from parallelism.tensor_parallel import table

    rows = [(p.tensor_parallel_size, p.pipeline_parallel_size, f"{p.weights_gb_per_gpu:.1f}",
             f"{p.kv_bytes_per_token_per_gpu / 1e3:.1f}", f"{p.kv_cache_tokens:,}" if p.fits else "does not fit",
             p.allreduce_per_token, f"{p.allreduce_bytes_per_token / 1e6:.2f}", f"{p.comm_ms_per_token:.2f}",
             f"{p.decode_ms_per_token:.2f}", f"{p.prefill_tokens_per_s:,.0f}") for p in plans]
    # A decode step gives every sequence of the batch one token: per step = per token at batch 1.
    return table(rows, ("TP", "PP", "weights_GB/GPU", "KV_KB/tok/GPU", "KV_tokens", "allreduce/step", "AR_MB/step",
                        "comm_ms/step", "decode_ms/step", "prefill_tok/s"))


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-70b", help="registry name or local HF folder")
    parser.add_argument("--num-gpus", type=int, nargs="+", default=[8])
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h100-sxm")
    parser.add_argument("--mem-bw-gbs", type=float, help="override the GPU memory bandwidth (GB/s)")
    parser.add_argument("--link-gbs", type=float, help="override the per-GPU interconnect bandwidth (GB/s)")
    parser.add_argument("--link-latency-us", type=float, help="override the latency of one collective (us)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens for the prefill estimate")
    parser.add_argument("--context-len", type=int, default=512, help="tokens of context per sequence in decode")
    parser.add_argument("--bytes-per-value", type=int, default=2, help="2 for bf16/fp16 weights and KV cache")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--out", help="write the plans as JSON")
    args = parser.parse_args(argv)
    if min(args.num_gpus) < 1 or args.batch_size < 1 or args.input_len < 1 or args.context_len < 0:
        raise UserError("--num-gpus, --batch-size and --input-len must be >= 1")
    cfg = model_config(args.model)
    hw = HARDWARE[args.hardware]
    overrides = {k: v for k, v in (("mem_bw_gbs", args.mem_bw_gbs), ("link_gbs", args.link_gbs),
                                   ("link_latency_us", args.link_latency_us)) if v is not None}
    if overrides:
        hw = Hardware(**{**asdict(hw), **overrides, "source": hw.source + " (overridden: " + ", ".join(overrides) + ")"})
    plans = [plan(cfg, t, p, hw, args.batch_size, args.input_len, args.context_len, args.bytes_per_value,
                  args.gpu_memory_utilization) for n in args.num_gpus for t, p in splits(n, cfg)]
    print(f"\n{args.model} ({cfg.num_params() / 1e9:.1f} B params, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads), {args.bytes_per_value}-byte values, on "
          f"{hw.name}: {hw.memory_gb:.0f} GB, HBM {hw.mem_bw_gbs:.0f} GB/s, link {hw.link_gbs:.0f} GB/s + "
          f"{hw.link_latency_us:.0f} us ({hw.source})")
    print(f"decode: batch {args.batch_size}, {args.context_len} tokens of context; prefill: one prompt of "
          f"{args.input_len} tokens; ideal estimates (no overlap, no launch overhead)\n")
    print(plan_table(plans))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "hardware": asdict(hw), "batch_size": args.batch_size,
                       "input_len": args.input_len, "context_len": args.context_len,
                       "plans": [asdict(p) | {"fits": p.fits} for p in plans]}, f, indent=2)


if __name__ == "__main__":
    main()
