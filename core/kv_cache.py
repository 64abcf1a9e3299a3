"""The KV-cache seam: attention hands its new keys/values to a cache object and asks it to attend.

A cache decides what it keeps (append / view / evict); `KVCache.attend` turns what it keeps into attention with a
mask built from the absolute positions of the kept keys. Policies in `kvcache/` and the paged cache in `engines/`
subclass it and override `update` (what is stored) or `attend` (how attention over it is computed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EMPTY = -1  # position value of a slot that holds no token (padding or not yet written)


def causal_mask(query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, T, S]: query t may see key s if s is a real token at or before t's position.

    Padding queries (position EMPTY) are allowed to see everything so softmax stays finite; their output is ignored.
    """
    allowed = (key_pos[:, None, :] <= query_pos[:, :, None]) & (key_pos[:, None, :] != EMPTY)
    allowed |= (query_pos == EMPTY)[:, :, None]
    return allowed[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q: [B, H, T, D]; k, v: [B, Hkv, S, D] with H a multiple of Hkv; mask: bool [B, 1, T, S] or None (= see all keys).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class KVCache:
    """Interface. `update` appends one layer's new keys/values and returns everything that layer attends over."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v: [B, Hkv, T, D] for tokens at `positions` [B, T]. Returns (keys, values, key_positions [B, S])."""
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        keys, values, key_pos = self.update(layer, k, v, positions)
        # Always build the mask on the device: asking the host whether any slot is empty would sync every layer.
        return attention(q, keys, values, causal_mask(positions, key_pos))


class StaticKVCache(KVCache):
    """Preallocated [B, Hkv, max_len, D] per layer, written left to right (the gpt-fast cache).

    Every row of the batch advances together, so ragged prompts are left-padded with position EMPTY.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_pos = torch.full((batch_size, max_len), EMPTY, dtype=torch.long, device=device)
        self.lengths = [0] * num_layers
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int):
        p = next(model.parameters())
        cfg = model.config
        return cls(cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim, p.dtype, p.device)

    def update(self, layer, k, v, positions):
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        if layer == 0:
            self.key_pos[:, start:end] = positions
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end], self.key_pos[:, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class PositionalKVCache(StaticKVCache):
    """Slot = absolute position, and `update` returns the whole buffer: every decode step has the same shapes and
    no host-side bookkeeping, so the step can be captured once in a CUDA graph and replayed (gpt-fast's trick).

    Attention then spans max_len keys every step, masked by position; that costs little next to reading the weights.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, max_len + 1, head_dim)  # the extra last slot absorbs padding tokens
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_pos = torch.full((batch_size, max_len + 1), EMPTY, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)[:, None]
        self.max_len = max_len
        self.lengths = None  # no write cursor: the position is the slot

    def update(self, layer, k, v, positions):
        slots = torch.where(positions == EMPTY, self.max_len, positions)  # [B, T]
        # x[rows, :, slots] selects [B, T, Hkv, D]: the new keys in token-major order.
        self.keys[layer][self.rows, :, slots] = k.transpose(1, 2)
        self.values[layer][self.rows, :, slots] = v.transpose(1, 2)
        if layer == 0:
            self.key_pos[self.rows, slots] = positions
        return self.keys[layer], self.values[layer], self.key_pos
