"""The paged KV cache: one pool of fixed-size blocks per layer, attention through block tables.

Pool layout per layer: keys and values [num_blocks, block_size, num_kv_heads, head_dim]. The model runner flattens a
step's tokens from every scheduled sequence into one row ([1, N]) and tells the cache, through `AttentionMetadata`,
where each new token goes (`slot_mapping`) and which blocks each sequence reads (its block table). `attend` writes
the new keys/values into their slots, then computes attention group by group: all decoding sequences together (one
query each) and each prefill chunk on its own, gathering each sequence's blocks into a padded [B, Hkv, S, D] view.
This is the PyTorch path; it runs anywhere and is the reference the GPU kernel is checked against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.kv_cache import EMPTY, KVCache, attention, causal_mask


@dataclass
class AttentionGroup:
    """Sequences whose attention is computed in one padded call.

    token_index: long [B, Tq] index of each query in the step's flat tokens (padding points at 0)
    valid: bool [B, Tq] real queries; block_tables: long [B, max_blocks] (padding points at block 0)
    mask: bool [B, 1, Tq, S] (S = max_blocks * block_size)
    """
    token_index: torch.Tensor
    valid: torch.Tensor
    block_tables: torch.Tensor
    mask: torch.Tensor
    single_query: bool  # decode group: Tq == 1 for every sequence


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # long [N]: pool slot (block * block_size + offset) of each new token
    groups: list[AttentionGroup]


def build_group(block_size: int, rows: list[tuple[int, int, int, list[int]]], device: torch.device) -> AttentionGroup:
    """rows: per sequence (tokens already cached, new tokens, flat index of its first new token, block table)."""
    starts, lengths, offsets, tables = zip(*rows)
    b = len(starts)
    t_max = max(lengths)
    max_blocks = max(len(t) for t in tables)
    table = torch.zeros(b, max_blocks, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    start = torch.tensor(starts)[:, None]
    length = torch.tensor(lengths)[:, None]
    t = torch.arange(t_max)[None]
    valid = t < length
    token_index = torch.where(valid, torch.tensor(offsets)[:, None] + t, 0)
    query_pos = torch.where(valid, start + t, EMPTY)
    s = torch.arange(max_blocks * block_size)[None]
    key_pos = torch.where(s < start + length, s, EMPTY)
    return AttentionGroup(token_index.to(device), valid.to(device), table.to(device),
                          causal_mask(query_pos, key_pos).to(device), t_max == 1)


class PagedKVCache(KVCache):
    """K/V pools shared by all sequences; which slots belong to whom is the block manager's business."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.metadata: AttentionMetadata | None = None  # set by the model runner before each forward

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """q: [1, H, N, D]; k, v: [1, Hkv, N, D] for the step's N flat tokens -> attention output [1, H, N, D]."""
        meta = self.metadata
        k_pool, v_pool = self.keys[layer], self.values[layer]
        hkv, d = k_pool.shape[2], k_pool.shape[3]
        # Write first, so each token attends to itself and to earlier tokens of its own chunk through the pool.
        k_pool.view(-1, hkv, d)[meta.slot_mapping] = k[0].transpose(0, 1)
        v_pool.view(-1, hkv, d)[meta.slot_mapping] = v[0].transpose(0, 1)
        q_flat = q[0].transpose(0, 1)  # [N, H, D]
        out = torch.empty_like(q_flat)
        for g in meta.groups:
            b = g.block_tables.shape[0]
            keys = k_pool[g.block_tables].view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
            values = v_pool[g.block_tables].view(b, -1, hkv, d).transpose(1, 2)
            if g.single_query:
                qg = q_flat[g.token_index[:, 0]][:, :, None]  # [B, H, 1, D]
                out[g.token_index[:, 0]] = attention(qg, keys, values, g.mask)[:, :, 0]
            else:
                qg = q_flat[g.token_index].transpose(1, 2)  # [B, H, Tq, D]
                og = attention(qg, keys, values, g.mask).transpose(1, 2)  # [B, Tq, H, D]
                out[g.token_index[g.valid]] = og[g.valid]
        return out.transpose(0, 1)[None]
