"""Our generation loop and transformers' `generate` on the same chat prompt (the first version of the main job).

Each runs in a process of its own (core.measure.run_isolated), so their peak memory is measured separately.
"""
from __future__ import annotations

import time

import torch

from core.measure import gpu_peak_mb

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
