"""Paged attention for decoding, as one Triton kernel: each query reads its keys straight out of the block pool.

The PyTorch path (paged_cache.py) first gathers a sequence's blocks into a contiguous tensor, then attends: on a GPU
that copies every key and value once more per layer, and decoding is bound by exactly those bytes. This kernel
follows the block table itself and keeps a running (online) softmax, so each key and value is read once.

One program per (sequence, KV head, split): it loads the GROUP query heads that share this KV head (grouped-query
attention), walks its share of the sequence's tokens a tile of blocks at a time, and writes the GROUP outputs. With
one split that is the answer; with several (small batches, where (sequence, KV head) pairs alone would leave most of
the GPU idle) each split also writes the log of its softmax mass, and a second kernel merges the splits.
A decode query is a single row per head, too thin for a matrix multiply, so the first version multiplied and summed
on CUDA cores in float32. Those reductions (across the threads holding a tile) turned out to be the bottleneck, not
the loads: padding the group's query heads to the 16 rows tl.dot needs and running both products on tensor cores
wastes arithmetic that is free and reads 24% faster on an H200 (engines/README.md). The CUDA-core form stays for
float32, where tensor cores would round (tests, the CPU interpreter).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_pool, v_pool, tables, seq_lens, out_ptr, lse_ptr, scale,
                         stride_qb, stride_qh, stride_pb, stride_ps, stride_ph, stride_tb, stride_ob, stride_oh,
                         stride_os, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         TILE: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    # This program's share of the sequence: whole tiles, so that every split but the last starts on a tile.
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE) * TILE
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    g = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=head_ok[:, None], other=0.0)
    if DOT:
        q = q.to(DOT_DTYPE)                                            # a no-op unless the pools hold FP8
    else:
        q = q.to(tl.float32) * scale                                   # [ROWS, D]
    m = tl.full([ROWS], float("-inf"), tl.float32)                     # running max of the scores
    l = tl.zeros([ROWS], tl.float32)                                   # running sum of exp(score - m)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)                       # running sum of exp(score - m) * v
    t = tl.arange(0, TILE)
    table = tables + b * stride_tb
    for start in range(lo, hi, TILE):
        tok = start + t
        valid = tok < hi
        if TILE == BLOCK_SIZE:  # tiles start on a block (lo is a multiple of TILE): one table entry per tile
            block = tl.load(table + start // BLOCK_SIZE).to(tl.int64)
            offset = block * stride_pb + t * stride_ps + kv_head * stride_ph
        else:
            block = tl.load(table + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            offset = block * stride_pb + (tok % BLOCK_SIZE) * stride_ps + kv_head * stride_ph   # [TILE]
        k = tl.load(k_pool + offset[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_pool + offset[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if DOT:  # tensor cores: [ROWS, D] x [D, TILE], most rows padding
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        else:    # CUDA cores: broadcast multiply, sum over D
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)     # [ROWS, TILE]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        if DOT:
            pv = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    has_keys = l > 0  # a split past the end of a short sequence saw nothing
    out = acc / tl.where(has_keys, l, 1.0)[:, None]
    out_at = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    if NUM_SPLITS > 1:  # the log of each split's softmax mass, for the merge
        lse = tl.where(has_keys, m + tl.log(l), float("-inf"))
        tl.store(lse_ptr + (b * GROUP * tl.num_programs(1) + heads) * NUM_SPLITS + split, lse, mask=head_ok)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, NUM_SPLITS: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
    """out = sum_i w_i part_i / sum_i w_i with w_i = exp(lse_i - max lse): each split's softmax rescaled to the whole."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    i = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + row * NUM_SPLITS + i)
    w = tl.exp(lse - tl.max(lse, axis=0))
    part = tl.load(part_ptr + (row * NUM_SPLITS + i[:, None]) * HEAD_DIM + d[None, :]).to(tl.float32)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def num_splits_for(batch: int, kv_heads: int, device: torch.device) -> int:
    """Enough programs to keep the GPU's memory system busy: about 12 per multiprocessor, the sequence split in up to
    16 pieces when (sequence, KV head) pairs alone are fewer. Measured on an H100 (engines/attention_bench.py,
    results/h100/attention_splits.json): 1 split for the Llama-2-7B shape at 64-256 sequences, 2 / 4 / 8 for
    SmolLM2's 3 KV heads at 256 / 128 / 32 sequences. Depends on the batch size only, so a captured graph keeps it."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return min(16, triton.next_power_of_2(max(1, 12 * sms // (batch * kv_heads))))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    """Asked once per device: this runs for every layer of every eager step."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, num_splits: int | None = None, tile: int | None = None,
                           dot: bool | None = None, dot_dtype: torch.dtype | None = None, **launch) -> torch.Tensor:
    """One query per sequence over its paged keys/values.

    q: [B, H, D]; k_pool, v_pool: [num_blocks, block_size, Hkv, D], q's dtype or FP8 (converted as read);
    block_tables: int [B, max_blocks];
    seq_lens: int [B], keys per sequence (>= 1; the query's own key already written). Returns [B, H, D].
    num_splits (a power of two; default: num_splits_for): with S > 1 each sequence's keys are cut into S parts
    attended by S programs at once ("flash-decoding"), then merged; at batch 1 there are only Hkv (sequence, head)
    pairs, too few programs to keep a GPU's memory system busy. dot: scores and weighted values through tl.dot on
    tensor cores, the group's query heads padded to 16 rows (default: for float16/bfloat16), else broadcast
    multiply and sum in float32 on CUDA cores. dot_dtype: the 16-bit type the products take (default: q's, or
    float16 for FP8 pools, below). `tile` (keys per loop step) and `launch` (Triton's num_warps,
    num_stages) override the defaults; engines/attention_bench.py sweeps them.
    """
    b, h, d = q.shape
    assert d == triton.next_power_of_2(d), "head_dim must be a power of two"
    block_size, hkv = k_pool.shape[1], k_pool.shape[2]
    group = h // hkv
    group_pad = triton.next_power_of_2(group)
    splits = num_splits or num_splits_for(b, hkv, q.device)
    if dot is None:
        dot = q.dtype in (torch.float16, torch.bfloat16) and d >= 16
    # Measured with engines/attention_bench.py over 32 layers' pools (results/h200/attention_dot.json): on an H200,
    # tensor cores with 64 keys per step on 2 warps read 4.2 TB/s for a full batch of the Llama-2-7B shape (422
    # sequences of 256-512 keys) where CUDA cores read 3.4 at best (16 keys), and 3.2 TB/s for SmolLM2's shape where
    # CUDA cores read 0.44-0.54: the reductions of the broadcast-and-sum form, not the loads, were the bottleneck.
    # Without tensor cores (float32: tests, the interpreter) 16 keys, and up to 32 for several heads per KV head.
    if tile is None:
        tile = 64 if dot else 16 if group_pad == 1 else max(16, min(32, 8192 // (group_pad * d)))
    fp8 = k_pool.dtype == torch.float8_e4m3fn
    # FP8 pools: every e4m3 value is exact in float16, so with bfloat16 queries the products take float16 (q rounded
    # to float16 keeps more mantissa; only |q| > 65504 would overflow). Converting FP8 tiles to float16 rather than
    # bfloat16 read 13% faster, and 2 warps with 2 pipeline stages fastest of the launches tried: 2.1 TB/s of FP8
    # for 256 sequences of the Llama-2-7B shape on an H100 where the conversion to bfloat16 with the 16-bit
    # defaults read 1.6 (engines/attention_bench.py --kv-dtypes fp8 --dot-dtypes bf16,fp16,
    # results/h100/attention_fp8{,_dtype}.json; 16-bit pools read 2.9 TB/s there: the conversion still costs).
    if dot_dtype is None:
        dot_dtype = torch.float16 if fp8 and q.dtype == torch.bfloat16 else q.dtype
    launch.setdefault("num_warps", 2)
    if fp8:
        launch.setdefault("num_stages", 2)
    q = q.contiguous()
    out = torch.empty_like(q)
    part = out[:, :, None] if splits == 1 else torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    # With one split the kernel writes no log-mass: any tensor fills the unused argument, nothing is allocated.
    lse = part if splits == 1 else torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    # tl.dot takes at least 16 rows: the group's query heads padded with empty rows. Float32 inputs (tests) multiply
    # in float32 ("ieee"), 16-bit ones on tensor cores.
    rows = max(16, group_pad) if dot else group_pad
    _paged_decode_kernel[(b, hkv, splits)](
        q, k_pool, v_pool, block_tables, seq_lens, part, lse, d ** -0.5,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        GROUP=group, ROWS=rows, BLOCK_SIZE=block_size, TILE=tile, HEAD_DIM=d, NUM_SPLITS=splits, DOT=dot,
        DOT_DTYPE=_TRITON_DTYPES.get(dot_dtype, tl.float32),
        PRECISION="tf32" if q.dtype in (torch.float16, torch.bfloat16) else "ieee", **launch)
    if splits > 1:
        _merge_splits_kernel[(b, h)](part, lse, out, out.stride(0), out.stride(1), NUM_SPLITS=splits, HEAD_DIM=d)
    return out
