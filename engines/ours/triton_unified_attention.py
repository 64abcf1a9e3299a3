"""Paged attention for a whole step, prefill chunks and decodes together, as one Triton kernel.

A scheduler that mixes prefill chunks and decodes in one step (chunked prefill) hands attention a flat batch of query
tokens: a few long runs of consecutive positions (prompt chunks) and many runs of length one (decodes). One rule covers
them all: a query at position p of its sequence attends to that sequence's keys 0..p. A decode is a run of one at the
sequence's last position, a fresh prefill a run starting at 0, a later chunk (or a prompt whose prefix was found in the
cache) a run starting after keys that are already in the pool. So the step's new keys are written into the pool
first, and then every query reads its keys through the block table, new and old alike: no separate prefill path.

The work is cut into query tiles of at most QUERY_TILE consecutive queries of one sequence, described by a small
int32 table [T, 4] built on the host (build_query_tiles). One program per (tile, KV head): it stacks its tile's
queries x the GROUP query heads sharing that KV head (grouped-query attention) into one [QUERY_TILE * GROUP_PAD, D]
matrix, so that every key and value it loads serves all of them, and walks the sequence's keys from position 0 to the
tile's last query, BLOCK_N keys at a time, with a running (online) softmax. Unlike a decode query (one row, see
triton_attention.py), this matrix is tall enough for tl.dot, i.e. for tensor cores. A decode-only tile leaves most
rows empty: that wastes arithmetic, not memory traffic, which is what bounds decoding.

A CUDA graph replays a fixed grid, so the tile table can be padded with tiles of length 0 that return at once, and q
can hold padding rows that no tile covers: their output is zero, a finite value for the rest of the model.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

QUERY_TILE = 16  # queries per tile; times GROUP_PAD the rows of the tile's matrix (tl.dot wants at least 16)


def build_query_tiles(chunks: list[tuple[int, int, int, int]], num_tiles: int | None = None,
                      query_tile: int = QUERY_TILE) -> torch.Tensor:
    """Cut each chunk (flat_start, length, first_position, table_row) into tiles of <= query_tile queries.

    Returns an int32 CPU tensor [T, 4] of rows (table_row, flat_start, length, first_position). With num_tiles, pads
    with rows of length 0 up to exactly num_tiles (a fixed grid for CUDA graphs); ValueError if more are needed."""
    rows = [(row, start + i, min(query_tile, length - i), first + i)
            for start, length, first, row in chunks for i in range(0, length, query_tile)]
    if num_tiles is not None:
        if len(rows) > num_tiles:
            raise ValueError(f"{len(rows)} query tiles needed, only {num_tiles} allowed")
        rows += [(0, 0, 0, 0)] * (num_tiles - len(rows))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)


def max_query_tiles(num_tokens: int, num_seqs: int, query_tile: int = QUERY_TILE) -> int:
    """The most tiles a step of num_tokens over num_seqs sequences can need: sum of ceil(len / tile) over the chunks
    is at most sum(len // tile + 1), and sum(len // tile) <= num_tokens // tile."""
    return num_tokens // query_tile + num_seqs


@triton.jit
def _unified_kernel(q_ptr, k_pool, v_pool, tables, tiles, out_ptr, scale,
                    stride_qn, stride_qh, stride_pb, stride_ps, stride_ph, stride_tb, stride_on, stride_oh,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr, QUERY_TILE: tl.constexpr, TO_FP32: tl.constexpr,
                    PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(tiles + tile * 4).to(tl.int64)
    start = tl.load(tiles + tile * 4 + 1).to(tl.int64)
    length = tl.load(tiles + tile * 4 + 2)
    first = tl.load(tiles + tile * 4 + 3)
    if length == 0:  # a padding tile: the grid is fixed, the work is not
        return
    # Row r of the tile's matrix is query r // GROUP_PAD of the tile, head r % GROUP_PAD of the group.
    r = tl.arange(0, QUERY_TILE * GROUP_PAD)
    i = r // GROUP_PAD
    g = r % GROUP_PAD
    row_ok = (i < length) & (g < GROUP)
    q_pos = first + i
    d = tl.arange(0, HEAD_DIM)
    q_at = (start + i)[:, None] * stride_qn + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_at, mask=row_ok[:, None], other=0.0)
    # float32 and float64 multiply in float32, like the decode kernel (the interpreter's tl.dot takes float64 too,
    # but a GPU has no float64 tensor cores and the tests need only float32 accuracy); 16-bit stays for tensor cores.
    if TO_FP32:
        q = q.to(tl.float32)
    m = tl.full([QUERY_TILE * GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([QUERY_TILE * GROUP_PAD], tl.float32)                # running sum of exp(score - m)
    acc = tl.zeros([QUERY_TILE * GROUP_PAD, HEAD_DIM], tl.float32)    # running sum of exp(score - m) * v
    hi = first + length  # keys 0..last query position; every one of them is in the pool already
    n = tl.arange(0, BLOCK_N)
    for key_start in range(0, hi, BLOCK_N):
        key_pos = key_start + n
        valid = key_pos < hi  # slots past the tile's last query may be unwritten (even NaN): never read them
        block = tl.load(tables + row * stride_tb + key_pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_at = block * stride_pb + (key_pos % BLOCK_SIZE) * stride_ps + kv_head * stride_ph  # int64: big pools
        k = tl.load(k_pool + kv_at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_pool + kv_at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        k = k.to(q.dtype)  # float32 (TO_FP32), or 16-bit from an FP8 pool; no-op for a pool of q's dtype
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale          # [rows, BLOCK_N], float32
        # Causal: key j is seen by a query at position p iff j <= p. Key 0 is seen by every row, so the first
        # tile makes every running max finite and no -inf - -inf (NaN) can arise, even in the masked rows.
        s = tl.where(key_pos[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out_at = (start + i)[:, None] * stride_on + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_at, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def unified_paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                            tiles: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of every query token of a step over its sequence's paged keys/values.

    q: [N, H, D], the step's queries, flat (rows no tile covers come out zero); k_pool, v_pool: [num_blocks,
    block_size, Hkv, D], q's dtype or FP8 (converted as read), with the step's own keys/values already written;
    block_tables: int32 [S, W]; tiles: int32 [T, 4] from build_query_tiles, on q's device. out: optional [N, H, D]
    of q's dtype (a graph's static buffer).
    Returns out.
    """
    _, h, d = q.shape
    assert d >= 16 and d == triton.next_power_of_2(d), f"head_dim must be a power of two >= 16 (tl.dot), got {d}"
    block_size, hkv = k_pool.shape[1], k_pool.shape[2]
    assert h % hkv == 0 and k_pool.stride() == v_pool.stride() and k_pool.stride(3) == 1 and tiles.is_contiguous()
    group = h // hkv
    group_pad = triton.next_power_of_2(group)
    if q.stride(2) != 1:
        q = q.contiguous()
    # Zeros first: padding rows must be finite. It is one pass over out, about what the kernel's stores cost.
    out = torch.zeros_like(q) if out is None else out.zero_()
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1
    rows = QUERY_TILE * group_pad
    # Smaller key tiles when the [rows, D] accumulator is already large (registers on a GPU).
    block_n = 64 if rows * d <= 64 * 64 else 32
    to_fp32 = q.dtype not in (torch.float16, torch.bfloat16)
    _unified_kernel[(tiles.shape[0], hkv)](
        q, k_pool, v_pool, block_tables, tiles, out, d ** -0.5,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n, HEAD_DIM=d,
        QUERY_TILE=QUERY_TILE, TO_FP32=to_fp32,
        # tf32 would round float32 inputs to 10-bit mantissas: exactness tests need "ieee" (ignored for 16-bit).
        PRECISION="ieee" if to_fp32 else "tf32", num_warps=4 if rows <= 64 else 8)
    return out
