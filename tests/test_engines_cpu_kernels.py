"""The CPU serving paths of our engine: the C++ paged decode attention kernel (engines/ours/cpu_attention.py) against
the reference gather + SDPA, and the oneDNN-prepacked Linear layers (engines/ours/cpu_linear.py) against nn.Linear."""
import json
import os
import random

import pytest
import torch

from core.config import ModelConfig
from core.kv_cache import attention
from core.loading import build_random
from engines.ours import cpu_attention, cpu_linear
from engines.ours.model_runner import ModelRunner
from engines.ours.paged_cache import AttentionMetadata, DecodeGroup, PagedKVCache

needs_kernel = pytest.mark.skipif(cpu_attention.load() is None, reason="the C++ kernel cannot be built here")


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI's machine is known to have g++ and ninja")
def test_kernel_builds_in_ci():
    """Elsewhere a missing compiler only means the reference path (and the skips above); in CI it would hide them."""
    assert cpu_attention.load() is not None


def paged_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """A pool with random contents and each sequence's blocks scattered over it in random order."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    width = max(max(needed), 1)
    tables = []
    for n in needed:
        own, free = free[:n], free[n:]
        tables.append(own + [free[0]] * (width - n))  # padding points at some other block: it must not be read
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_pool, v_pool = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    return q, k_pool, v_pool, torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32)


def reference_decode(q, k_pool, v_pool, tables, seq_lens):
    """The reference path of PagedKVCache.attend: gather each sequence's blocks, mask past its length, SDPA."""
    b, hkv, d = q.shape[0], k_pool.shape[2], k_pool.shape[3]
    keys = k_pool[tables.long()].view(b, -1, hkv, d).transpose(1, 2)
    values = v_pool[tables.long()].view(b, -1, hkv, d).transpose(1, 2)
    mask = torch.arange(keys.shape[2]) < seq_lens[:, None]
    return attention(q[:, :, None], keys, values, mask[:, None, None])[:, :, 0]


@needs_kernel
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 32)])
@pytest.mark.parametrize("block_size", [16, 4])
def test_kernel_equals_gather_and_sdpa(num_heads, num_kv_heads, head_dim, block_size):
    # Lengths at, below and just past block boundaries, a single key, and a long one.
    seq_lens = [1, block_size, block_size + 1, 3 * block_size - 1, 37, 200]
    case = paged_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, torch.float32)
    got = cpu_attention.load()(*case)
    assert got.shape == case[0].shape
    torch.testing.assert_close(got, reference_decode(*case), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_kernel_bfloat16_and_empty_sequence():
    case = paged_case([5, 40, 0], 4, 2, 32, 8, torch.bfloat16)
    got = cpu_attention.load()(*case)
    assert got.dtype == torch.bfloat16
    want = reference_decode(*(t.float() if t.is_floating_point() else t for t in case))
    torch.testing.assert_close(got[:2].float(), want[:2], atol=2e-2, rtol=2e-2)
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # no keys: zeros, not NaN


@needs_kernel
def test_paged_cache_attend_kernel_equals_reference_path():
    """PagedKVCache.attend's decode group through the kernel (the CPU default) and through the gather path."""
    seq_lens = [3, 17, 33]
    q, k_pool, v_pool, tables, lens = paged_case(seq_lens, 4, 2, 16, 8, torch.float32, seed=1)
    caches = [PagedKVCache(1, k_pool.shape[0], 8, 2, 16, torch.float32, torch.device("cpu"), cpu_kernel=flag)
              for flag in (None, False)]
    assert caches[0].decode_kernel is not None and caches[1].decode_kernel is None
    outs = []
    for cache in caches:
        cache.keys[0].copy_(k_pool)
        cache.values[0].copy_(v_pool)
        # Each sequence's new token goes to its last position; attend writes it there before attending.
        slots = torch.tensor([tables[i, (n - 1) // 8].item() * 8 + (n - 1) % 8 for i, n in enumerate(seq_lens)])
        cache.metadata = AttentionMetadata(slots, [DecodeGroup(torch.arange(3), tables, lens)], [], [])
        k_new, v_new = torch.randn(2, 1, 2, 3, 16, generator=torch.Generator().manual_seed(2))
        outs.append(cache.attend(0, q.transpose(0, 1)[None], k_new, v_new, None))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=1e-5)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_packed_linear_equals_linear(bias, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    packed = cpu_linear.packed(linear)
    assert isinstance(packed, cpu_linear.PackedLinear) and packed.weight is linear.weight
    x = torch.randn(2, rows, 48)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)


def test_packed_falls_back_where_onednn_cannot_run():
    half = torch.nn.Linear(8, 8).half()
    assert cpu_linear.packed(half) is half  # float16 is not packed
    assert cpu_linear.packed(torch.nn.Identity()).__class__ is torch.nn.Identity


@needs_onednn
def test_runner_packs_only_its_serving_copy():
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      vocab_size=256)
    model = build_random(cfg, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        want = model(ids)
        runner = ModelRunner(model, num_blocks=8, block_size=4, max_model_len=32, max_num_seqs=2)
        served = runner.model.layers[0]
        assert isinstance(served.self_attn.o_proj, cpu_linear.PackedLinear)
        assert isinstance(served.mlp.gate_up_proj, cpu_linear.PackedLinear)
        assert type(model.layers[0].self_attn.o_proj) is torch.nn.Linear  # the caller's model is left as it was
        torch.testing.assert_close(runner.model(ids), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids), want)


@needs_onednn
def test_cpu_linear_bench_times_every_served_matmul(tmp_path):
    from engines import cpu_linear_bench
    out = tmp_path / "bench.json"
    cpu_linear_bench.main(["--model", "tiny", "--rows", "1,3", "--calls", "1", "--repeats", "1", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["matmul"], r["rows"]) for r in results] == [
        (m, n) for m in ("q|k|v", "o", "gate|up", "down", "lm_head") for n in (1, 3)]
    assert results[0]["in"] == 64 and results[0]["out"] == 4 * 16 + 2 * 2 * 16  # tiny: 4 heads, 2 KV heads of 16
    assert all(r["plain_us"] > 0 and r["packed_us"] > 0 for r in results)
