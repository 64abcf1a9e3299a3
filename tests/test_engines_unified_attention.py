"""The unified paged-attention kernel (prefill chunks and decodes in one launch) against plain causal attention in
float64: run by Triton's interpreter on CPU, and on a GPU when there is one. Plus the host-side tile table."""
import math
import random

import pytest
import torch
from triton_interpreter import run_interpreted

SHAPES = [(9, 3, 64, 16), (4, 4, 32, 4), (8, 2, 16, 1), (32, 32, 128, 16)]


def reference(q, k_pool, v_pool, tables, chunks):
    """Per chunk: gather its sequence's keys 0..last position out of the blocks, masked causal softmax, float64.
    Rows of q that no chunk covers stay zero."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    h, hkv, d = q.shape[1], k_pool.shape[2], k_pool.shape[3]
    for start, length, first, row in chunks:
        n = first + length
        blocks = tables[row, :-(-n // k_pool.shape[1])].long()
        keys = k_pool[blocks].reshape(-1, hkv, d)[:n].double().repeat_interleave(h // hkv, dim=1)  # [n, H, D]
        values = v_pool[blocks].reshape(-1, hkv, d)[:n].double().repeat_interleave(h // hkv, dim=1)
        scores = torch.einsum("thd,nhd->htn", q[start:start + length].double(), keys) / math.sqrt(d)
        q_pos = torch.arange(first, n)
        scores = scores.masked_fill(torch.arange(n)[None, :] > q_pos[:, None], float("-inf"))
        out[start:start + length] = torch.einsum("htn,nhd->thd", scores.softmax(-1), values)
    return out


def mixed_step(heads, kv_heads, head_dim, block_size, dtype):
    """One step of a chunked-prefill scheduler: decodes, prefill chunks and padding, over a scattered pool.

    Pool slots past each sequence's last position, and blocks no sequence owns, hold NaN: reading one would show."""
    g = torch.Generator().manual_seed(0)
    bs = block_size
    # (query tokens, first position): first token of a sequence as a decode, a decode at 3*bs, a fresh 37-token
    # prefill (tiles of 16, 16, 5), a chunk continuing from cached position 50, exactly one tile from position 5.
    seqs = [(1, 0), (1, 3 * bs), (37, 0), (20, 50), (16, 5)]
    pads = [2, 0, 1, 0, 0, 3]  # padding rows of q before each chunk and after the last
    rows = [3, 0, 4, 1, 2]     # table rows in another order than the chunks; row 5 belongs to nobody
    chunks, flat = [], pads[0]
    for (length, first), row, pad in zip(seqs, rows, pads[1:]):
        chunks.append((flat, length, first, row))
        flat += length + pad
    blocks_per_seq = [-(-(first + length) // bs) for length, first in seqs]
    num_blocks = sum(blocks_per_seq) + 5
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered over the pool
    tables = torch.zeros(len(seqs) + 1, max(blocks_per_seq) + 1, dtype=torch.int32)
    k_pool = torch.full((num_blocks, bs, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_pool = k_pool.clone()
    for (length, first), row, nb in zip(seqs, rows, blocks_per_seq):
        tables[row, :nb] = torch.tensor(order[:nb])
        order = order[nb:]
        n = first + length
        keys = k_pool[tables[row, :nb].long()].view(-1, kv_heads, head_dim)  # a copy: write back below
        keys[:n] = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
        k_pool[tables[row, :nb].long()] = keys.view(nb, bs, kv_heads, head_dim)
        values = v_pool[tables[row, :nb].long()].view(-1, kv_heads, head_dim)
        values[:n] = torch.randn(n, kv_heads, head_dim, generator=g).to(dtype)
        v_pool[tables[row, :nb].long()] = values.view(nb, bs, kv_heads, head_dim)
    q = torch.randn(flat, heads, head_dim, generator=g).to(dtype)
    return q, k_pool, v_pool, tables, chunks


def check_kernel(heads, kv_heads, head_dim, block_size, dev, dtype=torch.float32, tol=1e-5, kv_dtype=None):
    """kv_dtype: pools of another dtype than q (float8_e4m3fn: an FP8 KV cache), the reference over the same values."""
    from engines.ours.triton_unified_attention import build_query_tiles, unified_paged_attention
    q, k_pool, v_pool, tables, chunks = mixed_step(heads, kv_heads, head_dim, block_size, dtype)
    if kv_dtype is not None:
        k_pool, v_pool = k_pool.to(kv_dtype), v_pool.to(kv_dtype)
    expected = reference(q, k_pool, v_pool, tables, chunks)
    tiles = build_query_tiles(chunks[::-1], num_tiles=12)  # 8 real tiles in any order, 4 padding tiles
    q, k_pool, v_pool, tables, tiles = [t.to(dev) for t in (q, k_pool, v_pool, tables, tiles)]
    out = unified_paged_attention(q, k_pool, v_pool, tables, tiles)
    torch.testing.assert_close(out.cpu().double(), expected, atol=tol, rtol=tol)
    static = torch.full_like(q, float("nan"))  # a graph's buffer, holding whatever the last replay left
    assert unified_paged_attention(q, k_pool, v_pool, tables, tiles, out=static) is static
    torch.testing.assert_close(static.cpu().double(), expected, atol=tol, rtol=tol)


def test_unified_attention_matches_plain_attention_interpreted():
    """Triton's interpreter must be switched on before Triton is imported: the checks run in a fresh process."""
    run_interpreted("from test_engines_unified_attention import check_kernel, SHAPES\n"
                    "for shape in SHAPES: check_kernel(*shape, 'cpu')\n"
                    "check_kernel(*SHAPES[0], 'cpu', torch.float64)\n"
                    "check_kernel(*SHAPES[2], 'cpu', torch.float16, 2e-2)\n"  # bfloat16: the interpreter gets it wrong
                    "check_kernel(*SHAPES[0], 'cpu', torch.float32, 1e-5, torch.float8_e4m3fn)\n")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-5), (torch.float16, 2e-2),
                                       (torch.bfloat16, 5e-2)])
def test_unified_attention_matches_plain_attention_gpu(shape, dtype, tol):
    check_kernel(*shape, "cuda", dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_unified_attention_reads_fp8_pools_gpu(shape, dtype, tol):
    check_kernel(*shape, "cuda", dtype, tol, torch.float8_e4m3fn)


def test_build_query_tiles_splits_and_pads():
    from engines.ours.triton_unified_attention import build_query_tiles
    tiles = build_query_tiles([(0, 37, 0, 2), (40, 1, 9, 0), (41, 16, 5, 1)], num_tiles=7)
    assert tiles.dtype == torch.int32 and tiles.tolist() == [
        [2, 0, 16, 0], [2, 16, 16, 16], [2, 32, 5, 32], [0, 40, 1, 9], [1, 41, 16, 5], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert build_query_tiles([(0, 37, 0, 2)], query_tile=32).tolist() == [[2, 0, 32, 0], [2, 32, 5, 32]]
    assert build_query_tiles([]).shape == (0, 4)
    with pytest.raises(ValueError):
        build_query_tiles([(0, 37, 0, 2)], num_tiles=2)


def test_max_query_tiles_is_an_upper_bound():
    from engines.ours.triton_unified_attention import build_query_tiles, max_query_tiles
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.choice([1, 1, 15, 16, 17, 32, rng.randint(1, 100)]) for _ in range(rng.randint(1, 12))]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        chunks = [(s, n, 0, i) for i, (s, n) in enumerate(zip(starts, lengths))]
        bound = max_query_tiles(sum(lengths), len(lengths))
        assert len(build_query_tiles(chunks)) <= bound
        assert build_query_tiles(chunks, num_tiles=bound).shape == (bound, 4)
    # Tight: four chunks of 17 and one of 1 need 2 + 2 + 2 + 2 + 1 tiles for 69 // 16 + 5.
    assert max_query_tiles(69, 5) == 9 == len(build_query_tiles([(0, 17, 0, 0)] * 4 + [(0, 1, 0, 0)]))
    assert max_query_tiles(64, 2, query_tile=32) == 4
