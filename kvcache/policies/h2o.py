"""H2O, Heavy-Hitter Oracle (Zhang et al., 2023): under a fixed budget keep the `recent` newest tokens plus the
keys that have received the most attention so far (accumulated softmax weights, the "heavy hitters").

Each KV head keeps its own set (scores summed over the query heads that share it), so the buffer is
[B, Hkv, S, D] with positions [B, Hkv, S]. Before T new tokens are appended the cache is cut to budget - T, so
it never holds more than `budget` tokens and no query sees more than `budget` keys, whatever the chunk size.
"""
from __future__ import annotations

import math

import torch

from core.kv_cache import KVCache, attention


class H2OCache(KVCache):
    def __init__(self, num_layers: int, budget: int, recent: int | None = None):
        self.budget = budget
        self.recent = budget // 2 if recent is None else recent  # the paper splits the budget evenly
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_pos: list[torch.Tensor | None] = [None] * num_layers  # [B, Hkv, S]
        self.scores: list[torch.Tensor | None] = [None] * num_layers  # accumulated attention, float32 [B, Hkv, S]

    def _evict(self, layer: int, incoming: int) -> None:
        """Cut the stored keys to budget - incoming: the newest ones first, heavy hitters for the rest."""
        n, keep = self.keys[layer].shape[2], self.budget - incoming
        if n <= keep:
            return
        if incoming > self.recent:
            raise ValueError(f"H2O: {incoming} new tokens at once exceed its recent window of {self.recent}")
        recent = min(self.recent - incoming, keep)
        old = self.scores[layer][:, :, : n - recent]  # slots are in position order: the last ones are the newest
        heavy = old.topk(keep - recent, dim=-1).indices.sort(dim=-1).values
        newest = torch.arange(n - recent, n, device=heavy.device).expand(*heavy.shape[:2], recent)
        idx = torch.cat([heavy, newest], dim=-1)  # [B, Hkv, keep]
        d = self.keys[layer].shape[-1]
        self.keys[layer] = self.keys[layer].gather(2, idx[..., None].expand(-1, -1, -1, d))
        self.values[layer] = self.values[layer].gather(2, idx[..., None].expand(-1, -1, -1, d))
        self.key_pos[layer] = self.key_pos[layer].gather(2, idx)
        self.scores[layer] = self.scores[layer].gather(2, idx)

    def update(self, layer, k, v, positions):
        B, Hkv, T, _ = k.shape
        pos = positions[:, None, :].expand(B, Hkv, T)
        zeros = torch.zeros(B, Hkv, T, device=k.device)
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer], self.key_pos[layer], self.scores[layer] = k, v, pos, zeros
        else:
            self._evict(layer, T)
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
            self.key_pos[layer] = torch.cat([self.key_pos[layer], pos], dim=2)
            self.scores[layer] = torch.cat([self.scores[layer], zeros], dim=2)
        return self.keys[layer], self.values[layer], self.key_pos[layer]

    def attend(self, layer, q, k, v, positions):
        keys, values, key_pos = self.update(layer, k, v, positions)
        B, H, T, D = q.shape
        group = H // keys.shape[1]
        visible = key_pos[:, :, None, :] <= positions[:, None, :, None]  # [B, Hkv, T, S]
        out = attention(q, keys, values, visible.repeat_interleave(group, dim=1))
        # The attention weights themselves, recomputed for the bookkeeping (fused kernels never materialise them).
        scores = (q.view(B, -1, group, T, D) @ keys[:, :, None].transpose(-1, -2)).float() / math.sqrt(D)
        weights = scores.masked_fill(~visible[:, :, None], float("-inf")).softmax(-1)  # [B, Hkv, group, T, S]
        self.scores[layer] += weights.sum(dim=(2, 3))
        return out

    def num_tokens(self, layer: int = 0) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
