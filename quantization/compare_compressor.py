"""Ours against llm-compressor: the same model prefix, calibration tokens and evaluation tokens, error and time.

Reads the dense folders that quantization.compressor wrote (llm-compressor's GPTQ/AWQ, dequantized), quantizes the
same first N decoder layers of the default model with our RTN, GPTQ and AWQ from the same calibration split, and
scores every variant on the evaluation split against the float model: the relative error of the final hidden states
(any N) and the perplexity (when N is the whole model).

    python -m quantization.compare_compressor /tmp/llmc-gptq2 /tmp/llmc-awq2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from core.data import plain_text
from core.errors import UserError, cli
from core.loading import LoadedModel, load_model
from core.perplexity import perplexity
from quantization.awq import awq_model
from quantization.gptq import gptq_model
from quantization.layerwise import calibration_ids
from quantization.linear import quantize_model


def prefix(lm: LoadedModel, num_layers: int) -> LoadedModel:
    """Keep the first `num_layers` decoder layers (in place)."""
    lm.model.layers = lm.model.layers[:num_layers]
    lm.model.config = dataclasses.replace(lm.model.config, num_layers=num_layers)
    return lm


@torch.no_grad()
def score(model: torch.nn.Module, reference: torch.Tensor, windows: torch.Tensor, full: bool) -> dict:
    """Relative error of the final hidden states [W, T, H] against the float model's, and perplexity if `full`."""
    h = torch.cat([model.hidden_states(w[None]) for w in windows])
    out = {"hidden_rel_error": ((h - reference).norm() / reference.norm()).item()}
    if full:
        out["perplexity"] = perplexity(model, windows.flatten(), windows.shape[1], windows.shape[1], progress=False)
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantization.compare_compressor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="outputs of quantization.compressor")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="evaluation-split tokens scored")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--search-samples", type=int, default=0, help="our AWQ grid-search samples (0: all, as "
                        "llm-compressor)")
    parser.add_argument("--n-grid", type=int, default=20, help="grid points of our AWQ searches (match the folder's)")
    parser.add_argument("--ours", default="rtn,gptq,gptq-act-order,awq", help="our methods to run, comma-separated")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    infos = []
    for f in args.folders:
        if not (f / "llmip_compressor.json").exists():
            raise UserError(f"{f} is not an output of quantization.compressor")
        infos.append(json.loads((f / "llmip_compressor.json").read_text()))
    n, gs, first = infos[0]["num_layers"], infos[0]["group_size"], infos[0].get("first_sample", 0)
    if any(i["num_layers"] != n or i["group_size"] != gs or i.get("first_sample", 0) != first for i in infos):
        raise UserError("the folders differ in layer count, group size or calibration draw: compare like with like")
    samples, seq_len = (int(x) for x in infos[0]["calibration"].split(" tokens")[0].split(" x "))

    base = load_model("smollm2-135m", "cpu", "float32")
    full = n == len(base.model.layers)
    prefix(base, n)
    text = plain_text("evaluation", max_chars=args.eval_tokens * 8)
    tokens = base.tokenizer(text, return_tensors="pt").input_ids[0][: args.eval_tokens]
    windows = tokens[: len(tokens) // args.window * args.window].view(-1, args.window)
    with torch.no_grad():
        reference = torch.cat([base.model.hidden_states(w[None]) for w in windows])
    ids = calibration_ids(base.tokenizer, samples, seq_len, first_sample=first)

    ours = {"rtn": lambda m: quantize_model(m, "int4", gs),
            "gptq": lambda m: gptq_model(m, ids, gs),
            "gptq-act-order": lambda m: gptq_model(m, ids, gs, act_order=True),
            "gptq-act-order-mse": lambda m: gptq_model(m, ids, gs, act_order=True, observer="mse"),
            "awq": lambda m: awq_model(m, ids, gs, n_grid=args.n_grid, search_samples=args.search_samples)}
    chosen = args.ours.split(",")
    if any(c not in ours for c in chosen):
        raise UserError(f"--ours takes {', '.join(ours)}")
    rows = []
    for key in chosen:
        name, quantize = f"ours {key}", ours[key]
        lm = prefix(load_model("smollm2-135m", "cpu", "float32"), n)
        t0, c0 = time.perf_counter(), time.process_time()
        quantize(lm.model)
        rows.append({"method": name, "quantize_s": time.perf_counter() - t0, "quantize_cpu_s": time.process_time() - c0,
                     **score(lm.model, reference, windows, full)})
        print(f"  {name:<28} {rows[-1]['hidden_rel_error']:.4f}", flush=True)
    for folder, info in zip(args.folders, infos):
        lm = load_model(str(folder), "cpu", "float32")
        name = info["method"] + (f" actorder={info['actorder']}" if info.get("actorder") else "")
        rows.append({"method": name, "quantize_s": info["quantize_s"], "quantize_cpu_s": info["quantize_cpu_s"],
                     **score(lm.model, reference, windows, full)})
        print(f"  {name:<28} {rows[-1]['hidden_rel_error']:.4f}", flush=True)

    print(f"\n{base.label}, first {n} decoder layers, INT4 g{gs} asymmetric; calibration {samples} x {seq_len} tokens "
          f"of the calibration split from sample {first}; scored on {windows.numel()} tokens of the evaluation split")
    head = f"{'method':<40}{'hidden rel. error':>18}{'perplexity':>12}{'wall s':>9}{'CPU s':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        print(f"{r['method']:<40}{r['hidden_rel_error']:>18.4f}{ppl:>12}{r['quantize_s']:>9.0f}"
              f"{r['quantize_cpu_s']:>9.0f}")
    if args.out:
        args.out.write_text(json.dumps({"model": base.label, "num_layers": n, "group_size": gs,
                                        "first_sample": first, "eval_tokens": windows.numel(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
