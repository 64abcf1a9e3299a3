"""AWQ of Llama-2-70B on one GPU: stream decoder layers, never hold the FP16 model, write the checkpoint as we go.

The FP16 model is 138 GB, more than an 80 GB GPU (or most hosts' free RAM). AWQ needs only one decoder layer at a
time: build (random, --random-weights) or read (from a sharded safetensors checkpoint) layer i, search and fold its
scales, clip, round to INT4, run the calibration activations through it for layer i+1, write its packed tensors to
the current shard, free it. Peak GPU memory is one FP16 layer (1.7 GB at 70B) plus calibration activations; the
output is an AutoAWQ-format folder (export.py) that vLLM and `--decode` load. Then --decode runs batch-1 greedy
decoding with the INT4 model on the one GPU and reports ms/token against its bandwidth floor.

    python -m quantization.awq_70b --random-weights --output-dir /tmp/llama2-70b-awq --decode    # H100, all 80 layers
    python -m quantization.awq_70b --random-weights --num-layers 4 --output-dir /tmp/l70   # time per layer, peak memory
    python -m quantization.awq_70b --model tiny --random-weights --device cpu --output-dir /tmp/tiny-awq --decode
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.config import ModelConfig
from core.errors import UserError, cli
from core.loading import find_model_dir, resolve_device, resolve_dtype
from core.measure import gpu_peak_mb, peak_rss_mb
from core.model import DecoderLayer, rope_inv_freq
from core.registry import REGISTRY
from quantization.awq import awq_layer
from quantization.export import awq_config, layer_tensors, load_awq, tensor_reader
from quantization.layerwise import LayerInputs, calibration_ids, run_layer


class LayerSource:
    """Decoder layers one at a time, from a checkpoint folder or freshly random (same init as core.loading)."""

    def __init__(self, model: str, random_weights: bool, device: torch.device, dtype: torch.dtype):
        spec = REGISTRY.get(model)
        self.random = random_weights or (spec is not None and spec.random_only)
        self.folder = None if self.random else find_model_dir(model)
        if self.folder is None:
            self.cfg = spec.config if spec else ModelConfig.from_hf(
                json.loads((find_model_dir(model) / "config.json").read_text()))
        else:
            self.cfg = ModelConfig.from_hf(json.loads((self.folder / "config.json").read_text()))
            self.read = tensor_reader(self.folder)
        self.device, self.dtype = device, dtype

    def tensor(self, name: str, shape: tuple[int, ...], fill: float | None = None) -> torch.Tensor:
        """A named tensor of the checkpoint (the 'model.' prefix is added), or a random/constant one."""
        if self.folder is not None:
            t = self.read(name if name == "lm_head.weight" else f"model.{name}")
            if t is None:
                raise UserError(f"{self.folder} has no tensor {name}")
            return t.to(self.device, self.dtype)
        t = torch.empty(shape, device=self.device, dtype=self.dtype)
        return t.fill_(fill) if fill is not None else t.normal_(0.0, 0.02)

    def layer(self, i: int) -> DecoderLayer:
        with torch.device("meta"):
            layer = DecoderLayer(self.cfg, i)
        state = {name: self.tensor(f"layers.{i}.{name}", tuple(p.shape), 1.0 if "norm" in name else None)
                 for name, p in layer.named_parameters()}
        layer.load_state_dict(state, assign=True)
        return layer.eval()


def rope_tables(cfg: ModelConfig, seq_len: int, device: torch.device, dtype: torch.dtype):
    """cos, sin [1, T, head_dim] and positions [1, T], as core.model.Transformer.rope computes them."""
    positions = torch.arange(seq_len, device=device)[None]
    freqs = positions[..., None].float() * rope_inv_freq(cfg).to(device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype), positions


def quantize_streaming(src: LayerSource, ids: torch.Tensor, output_dir: Path, group_size: int, n_grid: int,
                       search_samples: int, layers_per_shard: int, num_layers: int, batch_size: int) -> dict:
    """AWQ every decoder layer in turn, writing shards of `layers_per_shard` layers. Returns timing and memory."""
    cfg, dev = src.cfg, src.device
    output_dir.mkdir(parents=True, exist_ok=True)
    embed = src.tensor("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
    cos, sin, positions = rope_tables(cfg, ids.shape[1], dev, src.dtype)
    inputs = LayerInputs(torch.nn.functional.embedding(ids.to(dev), embed), cos, sin, positions)
    outer = {"model.embed_tokens.weight": embed.half().cpu()}
    del embed
    outer["model.norm.weight"] = src.tensor("norm.weight", (cfg.hidden_size,), 1.0).half().cpu()
    if not cfg.tie_word_embeddings:
        outer["lm_head.weight"] = src.tensor("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)).half().cpu()
    weight_map, shard, shard_index = {}, {}, 0
    t0 = time.perf_counter()

    def flush(tensors: dict) -> None:
        nonlocal shard_index
        name = f"model-{shard_index:05d}.safetensors"
        save_file(tensors, output_dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        shard_index += 1

    for i in tqdm(range(num_layers), desc="AWQ (streamed)", unit="layer"):
        layer = src.layer(i)
        sub = inputs if search_samples <= 0 else LayerInputs(inputs.hidden[:search_samples], cos, sin, positions)
        awq_layer(layer, sub, group_size, n_grid=n_grid, batch_size=batch_size)
        inputs.hidden = run_layer(layer, inputs, batch_size)
        shard.update({k: v.cpu() for k, v in layer_tensors(layer, i).items()})
        del layer
        if (i + 1) % layers_per_shard == 0 or i + 1 == num_layers:
            if i + 1 == num_layers:
                shard.update(outer)
            flush(shard)
            shard = {}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    cfg_out = ModelConfig(**{**cfg.__dict__, "num_layers": num_layers})
    (output_dir / "config.json").write_text(json.dumps(awq_config(cfg_out, group_size, "awq", src.random), indent=2))
    (output_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    if src.folder is not None:
        for f in src.folder.iterdir():
            if f.is_file() and ("token" in f.name or f.name in ("chat_template.jinja", "generation_config.json")):
                (output_dir / f.name).write_bytes(f.read_bytes())
    seconds = time.perf_counter() - t0
    return {"quantize_s": seconds, "s_per_layer": seconds / num_layers, "shards": shard_index,
            "checkpoint_gb": sum(f.stat().st_size for f in output_dir.glob("*.safetensors")) / 1e9}


def decode(output_dir: Path, device: str, max_tokens: int, prompt_len: int) -> dict:
    """Load the INT4 checkpoint onto one device (torch kernels on CUDA) and time batch-1 greedy decoding."""
    import statistics

    from core.bench_decode import copy_bandwidth_gbs, sync
    from core.generate import SamplingParams, generate
    from quantization.linear import weight_bytes

    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    lm = load_awq(output_dir, str(dev), dtype, backend="torch" if dev.type == "cuda" else "dequant")
    nbytes = weight_bytes(lm.model)
    vocab = lm.model.config.vocab_size
    prompt = torch.randint(0, min(vocab, 32000), (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    cuda_graph = dev.type == "cuda"
    generate(lm.model, [prompt], SamplingParams(max_tokens=4, ignore_eos=True), cuda_graph=cuda_graph)
    sync(dev)
    result = generate(lm.model, [prompt], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      cuda_graph=cuda_graph)
    ms = statistics.median(result.token_times_s) * 1e3
    row = {"decode_model": lm.label, "packed_weights_gb": nbytes / 1e9, "tpot_ms": ms,
           "decode_peak_gpu_mb": gpu_peak_mb(dev), "tokens": result.tokens[0][:16]}
    if dev.type == "cuda":
        bw = copy_bandwidth_gbs(dev)
        row.update(copy_bandwidth_gbs=bw, floor_ms=nbytes / (bw * 1e9) * 1e3)
        row["fraction_of_floor"] = row["floor_ms"] / ms
    return row


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.awq_70b", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-70b", help="registry name or a sharded HF checkpoint folder")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="layers in this dtype while quantizing (auto: bf16 on GPU)")
    parser.add_argument("--num-layers", type=int, default=0, help="quantize only the first N layers (0: all)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--search-samples", type=int, default=8, help="samples the AWQ grid searches use (0: all)")
    parser.add_argument("--n-grid", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers-per-shard", type=int, default=4)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--decode", action="store_true", help="then decode with the INT4 checkpoint on this device")
    parser.add_argument("--decode-only", action="store_true", help="skip quantization: decode an existing folder")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    dev = resolve_device(args.device)
    row: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    if not args.decode_only:
        src = LayerSource(args.model, args.random_weights, dev, resolve_dtype(args.dtype, dev))
        n = args.num_layers or src.cfg.num_layers
        c = src.cfg
        if any(k % args.group_size for k in (c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim)):
            raise UserError(f"--group-size {args.group_size} does not divide the input sizes of {args.model}")
        if src.random:
            # Random weights: calibration text means nothing to them; random token ids keep the shapes honest.
            ids = torch.randint(0, src.cfg.vocab_size, (args.num_calibration_samples, args.max_seq_length),
                                generator=torch.Generator().manual_seed(0))
        else:
            from core.loading import load_tokenizer

            ids = calibration_ids(load_tokenizer(src.folder), args.num_calibration_samples, args.max_seq_length)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        row.update(model=f"{args.model} [{'RANDOM weights' if src.random else 'trained weights'}]",
                   layers=n, group_size=args.group_size,
                   calibration=f"{args.num_calibration_samples} x {args.max_seq_length} tokens",
                   **quantize_streaming(src, ids, args.output_dir, args.group_size, args.n_grid,
                                        args.search_samples, args.layers_per_shard, n, args.batch_size))
        row.update(quantize_peak_gpu_mb=gpu_peak_mb(dev), quantize_peak_rss_mb=peak_rss_mb())
        print(f"\nAWQ INT4 g{args.group_size} of {row['model']}, {n} layers, on {row['device']}: "
              f"{row['quantize_s']:.0f} s; peak GPU {row['quantize_peak_gpu_mb']:.0f} MB, peak CPU RSS "
              f"{row['quantize_peak_rss_mb']:.0f} MB; checkpoint {row['checkpoint_gb']:.2f} GB in {row['shards']} "
              f"shards at {args.output_dir}")
        if n < c.num_layers:
            row["estimated_all_layers_s"] = row["s_per_layer"] * c.num_layers
            print(f"  {row['s_per_layer']:.1f} s per layer: all {c.num_layers} layers would take about "
                  f"{row['estimated_all_layers_s'] / 60:.0f} min (peak memory does not grow with the layer count)")
    if args.decode or args.decode_only:
        row.update(decode(args.output_dir, args.device, args.max_tokens, args.prompt_len))
        line = (f"INT4 decode, batch 1, on {row['device']}: packed weights {row['packed_weights_gb']:.2f} GB, "
                f"{row['tpot_ms']:.2f} ms/token")
        if "floor_ms" in row:
            line += (f"; floor {row['floor_ms']:.2f} ms at {row['copy_bandwidth_gbs']:.0f} GB/s copy bandwidth = "
                     f"{row['fraction_of_floor']:.0%} of it; peak GPU {row['decode_peak_gpu_mb']:.0f} MB")
        print(line)
    if args.out:
        args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
