"""Full cache: keeps every token. The reference every other policy is checked against, and the base of the
evicting policies: they only say which stored keys to keep (`keep`) before the next tokens are appended."""
from __future__ import annotations

import torch

from core.kv_cache import KVCache


class FullCache(KVCache):
    """Per layer a compact buffer [B, Hkv, S, D] grown by concatenation, with `key_pos` [B, S] (absolute positions).

    The rows of a batch must advance together (same positions, no padding): evicting policies drop the same slots
    in every row.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_pos: list[torch.Tensor | None] = [None] * num_layers

    def keep(self, layer: int, positions: torch.Tensor) -> torch.Tensor | None:
        """Indices of stored slots to keep before tokens at `positions` [B, T] are appended (None: keep all)."""
        return None

    def update(self, layer, k, v, positions):
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer], self.key_pos[layer] = k, v, positions
        else:
            idx = self.keep(layer, positions)
            keys, values, key_pos = self.keys[layer], self.values[layer], self.key_pos[layer]
            if idx is not None:
                keys, values, key_pos = keys[:, :, idx], values[:, :, idx], key_pos[:, idx]
            self.keys[layer] = torch.cat([keys, k], dim=2)
            self.values[layer] = torch.cat([values, v], dim=2)
            self.key_pos[layer] = torch.cat([key_pos, positions], dim=1)
        return self.keys[layer], self.values[layer], self.key_pos[layer]

    def num_tokens(self, layer: int = 0) -> int:
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def nbytes(self) -> int:
        """Bytes of the stored keys and values (positions and bookkeeping excluded, as in StaticKVCache)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
