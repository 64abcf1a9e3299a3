"""Perplexity with a sliding window, as the Hugging Face guide computes it for fixed-length models."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor | list[int], window: int = 1024, stride: int = 512,
               progress: bool = True) -> float:
    """exp(mean negative log-likelihood) over `token_ids`, each token scored once with up to `window` of context.

    Windows start every `stride` tokens; only the tokens not scored by the previous window count, so every token
    after the first window sees at least `window - stride` tokens of context.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    device = next(model.parameters()).device
    nll, counted, prev_end = 0.0, 0, 0
    starts = range(0, max(len(ids) - 1, 1), stride)
    for begin in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end].to(device)[None]
        logits = model(chunk)[0, :-1].float()
        targets = chunk[0, 1:]
        new = end - max(prev_end, begin + 1)  # tokens this window scores for the first time
        losses = F.cross_entropy(logits[-new:], targets[-new:], reduction="sum")
        nll += losses.item()
        counted += new
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / counted)
