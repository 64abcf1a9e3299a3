"""Paged attention for decoding, as one Triton kernel: each query reads its keys straight out of the block pool.

The PyTorch path (paged_cache.py) first gathers a sequence's blocks into a contiguous tensor, then attends: on a GPU
that copies every key and value once more per layer, and decoding is bound by exactly those bytes. This kernel
follows the block table itself and keeps a running (online) softmax, so each key and value is read once.

One program per (sequence, KV head): it loads the GROUP query heads that share this KV head (grouped-query
attention), walks the sequence's tokens a tile of blocks at a time, and writes the GROUP outputs.
The arithmetic is done on CUDA cores in float32 (broadcast multiply and sum, no tensor cores): a decode query is a
single row, so the work is memory-bound and the tile loads are what matter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_pool, v_pool, tables, seq_lens, out_ptr, scale,
                         stride_qb, stride_qh, stride_pb, stride_ps, stride_ph, stride_tb, stride_ob, stride_oh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         TILE: tl.constexpr, HEAD_DIM: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale                                       # [GROUP_PAD, D]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)                # running max of the scores
    l = tl.zeros([GROUP_PAD], tl.float32)                              # running sum of exp(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)                  # running sum of exp(score - m) * v
    t = tl.arange(0, TILE)
    for start in range(0, seq_len, TILE):
        tok = start + t
        valid = tok < seq_len
        block = tl.load(tables + b * stride_tb + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        offset = block * stride_pb + (tok % BLOCK_SIZE) * stride_ps + kv_head * stride_ph   # [TILE]
        k = tl.load(k_pool + offset[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)             # [GROUP_PAD, TILE]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_pool + offset[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None])


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor) -> torch.Tensor:
    """One query per sequence over its paged keys/values.

    q: [B, H, D]; k_pool, v_pool: [num_blocks, block_size, Hkv, D]; block_tables: int [B, max_blocks];
    seq_lens: int [B], keys per sequence (>= 1; the query's own key already written). Returns [B, H, D].
    """
    b, h, d = q.shape
    assert d == triton.next_power_of_2(d), "head_dim must be a power of two"
    block_size, hkv = k_pool.shape[1], k_pool.shape[2]
    group = h // hkv
    group_pad = triton.next_power_of_2(group)
    # Tiles as long as a [GROUP_PAD, TILE, D] product of ~8K floats allows: more loads in flight per program.
    tile = max(16, min(128, triton.next_power_of_2(max(8192 // (group_pad * d), 1))))
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(b, hkv)](
        q, k_pool, v_pool, block_tables, seq_lens, out, d ** -0.5,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=block_size, TILE=tile, HEAD_DIM=d)
    return out
