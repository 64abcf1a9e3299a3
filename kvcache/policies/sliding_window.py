"""Sliding window: every query sees only the last `window` tokens (itself included), as Mistral's attention does.

Keys keep their absolute RoPE positions, so the relative distances the model sees are the true ones; what it
loses is everything older than the window, the first tokens of the text included (the attention sinks), which is
why perplexity breaks once they are evicted (StreamingLLM, Fig. 1b).
"""
from __future__ import annotations

import torch

from core.kv_cache import attention, causal_mask
from kvcache.policies.full import FullCache


class SlidingWindowCache(FullCache):
    def __init__(self, num_layers: int, window: int):
        super().__init__(num_layers)
        self.window = window

    def keep(self, layer, positions):
        # Keep what the earliest incoming query can still see; the mask narrows it for the later ones. Fed one
        # token at a time, the cache holds exactly `window` tokens; fed T at a time, at most window - 1 + T.
        return (self.key_pos[layer][0] > positions[0, 0] - self.window).nonzero().squeeze(1)

    def attend(self, layer, q, k, v, positions):
        keys, values, key_pos = self.update(layer, k, v, positions)
        in_band = key_pos[:, None, :] > positions[:, :, None] - self.window  # [B, T, S]
        return attention(q, keys, values, causal_mask(positions, key_pos) & in_band[:, None])
