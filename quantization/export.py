"""Export a quantized model as an AutoAWQ-format ("GEMM", quant_method awq) Hugging Face folder, and load one back.

Per projection the folder holds `qweight` int32 [K, N/8] (AWQ's interleaved packing, see packing.py), `qzeros`
int32 [G, N/8] and `scales` float16 [G, N], with W[n, k] = (q - z) * s as in our Int4Linear, so GPTQ and RTN results
export the same way (GPTQ without act-order is the same arithmetic; with act-order we keep contiguous groups).
Embeddings, norms and the LM head stay float16. vLLM loads this with quantization="awq" (on CPUs through its WNA16
kernel); transformers needs the archived autoawq package for it, which does not install with current torch.

    python -m quantization.export --method awq --output-dir /tmp/smollm2-awq
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from core.config import ModelConfig
from core.errors import UserError, cli
from core.loading import LoadedModel
from core.model import Transformer
from quantization.linear import LAYER_LINEARS, Int4Linear, set_module
from quantization.packing import pack_awq, unpack_awq


def awq_tensors(prefix: str, m: Int4Linear) -> dict[str, torch.Tensor]:
    """One Int4Linear as AutoAWQ GEMM tensors named `prefix.qweight` etc."""
    out = {f"{prefix}.qweight": pack_awq(m.codes().T.contiguous()),
           f"{prefix}.qzeros": pack_awq(m.zeros.T.contiguous()),
           f"{prefix}.scales": m.scales.T.to(torch.float16).contiguous()}
    if m.bias is not None:
        out[f"{prefix}.bias"] = m.bias.to(torch.float16)
    return out


def awq_config(cfg: ModelConfig, group_size: int, method: str, random_weights: bool = False) -> dict:
    hf = cfg.to_hf()
    hf["torch_dtype"] = "float16"
    hf["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                 "version": "gemm", "modules_to_not_convert": None,
                                 # which of our methods made it, from which weights (other loaders ignore these)
                                 "llmip_method": method, "llmip_random_weights": random_weights}
    return hf


def layer_tensors(layer: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
    """All tensors of one quantized decoder layer, named as in a Hugging Face Llama checkpoint."""
    out = {}
    for name in LAYER_LINEARS:
        m = layer.get_submodule(name)
        if not isinstance(m, Int4Linear):
            raise UserError(f"layers.{index}.{name} is {type(m).__name__}, not INT4: quantize the model first")
        out.update(awq_tensors(f"model.layers.{index}.{name}", m))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{index}.{norm}.weight"] = getattr(layer, norm).weight.detach().to(torch.float16)
    return out


def outer_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    if not isinstance(model.embed_tokens, torch.nn.Embedding):
        raise UserError("the AWQ format keeps the embedding and LM head in 16 bits: export a model whose head was "
                        "not quantized (quantize_embeddings)")
    out = {"model.embed_tokens.weight": model.embed_tokens.weight.detach().to(torch.float16),
           "model.norm.weight": model.norm.weight.detach().to(torch.float16)}
    if not model.config.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight.detach().to(torch.float16)
    return out


def export_awq(lm: LoadedModel, output_dir: Path, group_size: int, method: str = "rtn") -> Path:
    """Write config.json, model.safetensors and the tokenizer of an INT4-quantized model to `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tensors = outer_tensors(lm.model)
    for i, layer in enumerate(lm.model.layers):
        tensors.update(layer_tensors(layer, i))
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, output_dir / "model.safetensors",
              metadata={"format": "pt"})
    (output_dir / "config.json").write_text(json.dumps(awq_config(lm.model.config, group_size, method,
                                                                         lm.random_weights), indent=2))
    if lm.path is not None and not lm.random_weights:  # random weights get no tokenizer (loaders use the default)
        for f in lm.path.iterdir():  # tokenizer, chat template, generation config
            if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy(f, output_dir / f.name)
    return output_dir


def int4_from_awq(read, prefix: str, dtype: torch.dtype, device: torch.device) -> Int4Linear:
    """Rebuild one Int4Linear from AWQ tensors; read(name) returns a tensor or None. Unpacks on `device`."""
    scales = read(f"{prefix}.scales").to(device)
    codes = unpack_awq(read(f"{prefix}.qweight").to(device)).T.contiguous()
    zeros = unpack_awq(read(f"{prefix}.qzeros").to(device)).T.contiguous()
    bias = read(f"{prefix}.bias")
    return Int4Linear.from_codes(codes, scales.T.float(), zeros, None if bias is None else bias.to(device), dtype)


def tensor_reader(folder: Path):
    """read(name) -> tensor or None, opening each safetensors shard lazily (a 70B checkpoint never sits in RAM)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"no *.safetensors in {folder}")
    handles = [safe_open(f, "pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    return lambda name: where[name].get_tensor(name) if name in where else None


def load_awq(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
             backend: str = "dequant") -> LoadedModel:
    """Our model with Int4Linear projections from an AutoAWQ-format folder (ours or anyone's), layer by layer.

    backend="torch" converts each projection to the torch kernel's layout as it loads, holding one layout only.
    """
    folder, dev = Path(folder), torch.device(device)
    hf = json.loads((folder / "config.json").read_text())
    qc = hf.get("quantization_config", {})
    if qc.get("quant_method") != "awq" or qc.get("bits", qc.get("w_bit")) != 4:
        raise UserError(f"{folder} is not a 4-bit AWQ checkpoint")
    cfg = ModelConfig.from_hf(hf)
    read = tensor_reader(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    for i, layer in enumerate(model.layers):
        for name in LAYER_LINEARS:
            m = int4_from_awq(read, f"model.layers.{i}.{name}", dtype, dev)
            if backend == "torch":
                m.use_kernel_only()
            set_module(layer, name, m)
    rest = {}
    for name, _ in list(model.named_parameters()):
        key = name if name == "lm_head.weight" else f"model.{name}"
        t = read(key)
        if t is None and not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            raise UserError(f"{folder}: missing tensor {key}")
        if t is not None:
            rest[name] = t.to(device=dev, dtype=dtype)
    model.load_state_dict(rest, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    tokenizer_dir = folder if (folder / "tokenizer.json").exists() else None
    return LoadedModel(model.eval(), folder.name, bool(qc.get("llmip_random_weights")), folder, tokenizer_dir)


@cli
def main(argv: list[str] | None = None) -> None:
    from quantization.gptq import add_calibration_args, run_method

    parser = argparse.ArgumentParser(prog="python -m quantization.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_calibration_args(parser)
    parser.add_argument("--method", choices=("rtn", "gptq", "awq"), default="awq")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        raise UserError("--output-dir is required")
    from quantization.awq import awq_model
    from quantization.gptq import gptq_model
    from quantization.linear import quantize_model

    methods = {"rtn": lambda m, ids, gs: quantize_model(m, "int4", gs, args.symmetric),
               "gptq": lambda m, ids, gs: gptq_model(m, ids, gs, args.symmetric, batch_size=args.batch_size),
               "awq": lambda m, ids, gs: awq_model(m, ids, gs, args.symmetric, batch_size=args.batch_size,
                                                   search_samples=8)}  # as quantization.awq's default
    run_method(args, args.method.upper(), methods[args.method])


if __name__ == "__main__":
    main()
