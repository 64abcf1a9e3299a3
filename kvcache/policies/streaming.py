"""StreamingLLM (Xiao et al., 2023): keep the first `sinks` tokens (attention sinks) and the most recent ones.

Positions are those inside the cache, as the paper does: a cache [0 1 2 3 | 6 7 8] decoding token 9 places the
keys at 0..6 and the query at 7. Because RoPE scores depend only on the query-key distance, that is the same as
  * recent keys at their true distance from the query (9 - 6 = 7 - 4), which is what their stored absolute
    rotation already gives, and
  * sink keys at distance (query's cache slot - sink slot), where the query's cache slot is min(p, budget - 1).
So instead of un-rotating and re-rotating every key each step, we rotate the query once more, by
cache_slot - p (<= 0), and use that copy for the sink scores only. Exact, for chunks of any size: each query gets
the sinks and its own `recent` most recent tokens, as if the stream were fed one token at a time.
"""
from __future__ import annotations

import math

import torch

from core.kv_cache import attention, causal_mask
from kvcache.policies.full import FullCache


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE-encoded x [B, H, T, D] by `shift` [B, T] more positions (negative moves it back)."""
    freqs = shift[..., None].float() * inv_freq.to(x.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class StreamingLLMCache(FullCache):
    def __init__(self, num_layers: int, inv_freq: torch.Tensor, sinks: int = 4, recent: int = 1020):
        super().__init__(num_layers)
        self.inv_freq, self.sinks, self.recent = inv_freq, sinks, recent

    @property
    def budget(self) -> int:
        return self.sinks + self.recent

    def keep(self, layer, positions):
        pos = self.key_pos[layer][0]
        return ((pos < self.sinks) | (pos > positions[0, 0] - self.recent)).nonzero().squeeze(1)

    def attend(self, layer, q, k, v, positions):
        keys, values, key_pos = self.update(layer, k, v, positions)
        is_sink = (key_pos < self.sinks)[:, None, :]  # [B, 1, S]
        in_window = key_pos[:, None, :] > positions[:, :, None] - self.recent  # [B, T, S]
        mask = causal_mask(positions, key_pos) & (is_sink | in_window)[:, None]
        shift = positions.clamp(max=self.budget - 1) - positions  # query's cache slot minus its absolute position
        if not bool(shift.any()):  # cache not yet full: positions inside the cache are the absolute ones
            return attention(q, keys, values, mask)
        group = q.shape[1] // keys.shape[1]
        k_all = keys.repeat_interleave(group, dim=1)
        scores = q @ k_all.transpose(-1, -2)
        sink_scores = rotate(q, shift, self.inv_freq) @ k_all.transpose(-1, -2)
        scores = torch.where(is_sink[:, None], sink_scores, scores) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~mask, float("-inf")).float().softmax(-1).to(q.dtype)
        return weights @ values.repeat_interleave(group, dim=1)
