"""Our generation loop and transformers' `generate` on the same chat prompt: tokens/s, peak memory, and whether the
greedy texts are identical (the first version of the main job, now its one-minute warm-up).

    python -m optimization.quickstart [--model M --device cuda --random-weights --max-tokens 64 --out q.json]

Each runs in a process of its own (core.measure.run_isolated), so their peak memory is measured separately.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from core.__main__ import add_model_args
from core.errors import cli
from core.measure import gpu_peak_mb, run_isolated

PROMPT = "Explain in three sentences why the KV cache makes text generation faster."


def run_ours(model: str, device: str, dtype: str, random_weights: bool, max_tokens: int) -> dict:
    from core.generate import SamplingParams, chat_prompt, generate
    from core.loading import load_model

    lm = load_model(model, device, dtype, random_weights)
    ids = chat_prompt(lm.tokenizer, PROMPT)
    params = SamplingParams(max_tokens=max_tokens)
    generate(lm.model, [ids], SamplingParams(max_tokens=4))  # warm-up
    t0 = time.perf_counter()
    out = generate(lm.model, [ids], params).tokens[0]
    elapsed = time.perf_counter() - t0
    dev = next(lm.model.parameters()).device
    return {"label": lm.label, "tokens": out, "text": lm.tokenizer.decode(out), "seconds": elapsed,
            "tokens_per_s": len(out) / elapsed, "gpu_peak_mb": gpu_peak_mb(dev), "path": str(lm.path or "")}


def run_transformers(model: str, device: str, dtype: str, random_weights: bool, max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from core.generate import chat_prompt
    from core.loading import find_model_dir, load_model, load_tokenizer, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if random_weights:  # the same random weights as ours: copy our state dict into transformers' model
        ours = load_model(model, device, dtype, True)
        hf = AutoModelForCausalLM.from_config(LlamaConfig(**ours.model.config.to_hf())).to(dev, dt)
        hf.model.load_state_dict({k: v for k, v in ours.model.state_dict().items() if k != "lm_head.weight"},
                                 strict=False)
        hf.lm_head.weight = torch.nn.Parameter(ours.model.lm_head.weight.detach().clone())
        tokenizer = ours.tokenizer
        del ours
    else:
        folder = find_model_dir(model)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dt).to(dev)
        tokenizer = load_tokenizer(folder)
    hf.eval()
    ids = torch.tensor([chat_prompt(tokenizer, PROMPT)], device=dev)
    with torch.inference_mode():
        # An explicit mask: SmolLM2's pad id is <|im_end|>, which chat prompts contain.
        mask = torch.ones_like(ids)
        hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    elapsed = time.perf_counter() - t0
    return {"tokens": out, "text": tokenizer.decode(out), "seconds": elapsed, "tokens_per_s": len(out) / elapsed,
            "gpu_peak_mb": gpu_peak_mb(dev)}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m optimization.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    common = (args.model, args.device, args.dtype, args.random_weights, args.max_tokens)

    print(f"our model and transformers.generate, greedy, {args.max_tokens} new tokens, one process each")
    ours, ours_rss = run_isolated(run_ours, *common)
    theirs, theirs_rss = run_isolated(run_transformers, *common)
    identical = ours["tokens"] == theirs["tokens"]

    print(f"\nprompt: {PROMPT}\nanswer (ours): {ours['text'].strip()}\n")
    rows = [("implementation", "tokens", "tokens/s", "peak RSS MB", "peak GPU MB"),
            ("ours (core.generate)", len(ours["tokens"]), f"{ours['tokens_per_s']:.1f}", f"{ours_rss:.0f}",
             f"{ours['gpu_peak_mb']:.0f}"),
            ("transformers generate", len(theirs["tokens"]), f"{theirs['tokens_per_s']:.1f}", f"{theirs_rss:.0f}",
             f"{theirs['gpu_peak_mb']:.0f}")]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print(f"\nidentical greedy text: {'yes' if identical else 'NO'}   model: {ours['label']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": ours["label"], "identical_greedy": identical,
                                        "ours": {**ours, "peak_rss_mb": ours_rss},
                                        "transformers": {**theirs, "peak_rss_mb": theirs_rss}}, indent=2))


if __name__ == "__main__":
    main()
