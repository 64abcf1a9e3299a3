"""Cache policies against references: the full cache, a banded mask built directly, StreamingLLM done literally
(un-rotated keys re-rotated at their cache slots every step), the float cache for quantization."""
import pytest
import torch
import torch.nn.functional as F

from core.kv_cache import KVCache, StaticKVCache, attention, causal_mask
from core.model import apply_rope
from kvcache.policies import H2OCache, make_cache
from kvcache.policies.quantized import dequantize, quantize
from kvcache.policies.streaming import rotate


def run_chunks(model, ids, cache, chunk):
    """Feed ids [1, N] in chunks of `chunk` tokens; logits [N, vocab]."""
    out = []
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            pos = torch.arange(s, min(s + chunk, ids.shape[1]))[None]
            out.append(model(ids[:, s:s + chunk], pos, cache)[0])
    return torch.cat(out)


@pytest.fixture(scope="module")
def ids(tiny):
    return torch.randint(0, tiny.model.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("policy", ["window", "streaming", "h2o"])
@pytest.mark.parametrize("chunk", [1, 16, 90])
def test_large_budget_equals_full_cache_exactly(tiny, ids, policy, chunk):
    full = run_chunks(tiny.model, ids, make_cache("full", tiny.model), chunk)
    other = run_chunks(tiny.model, ids, make_cache(policy, tiny.model, budget=200), chunk)
    assert torch.equal(full, other)


def test_full_cache_equals_static_cache_and_no_cache(tiny, ids):
    full = run_chunks(tiny.model, ids, make_cache("full", tiny.model), 16)
    static = run_chunks(tiny.model, ids, StaticKVCache.for_model(tiny.model, 1, 90), 16)
    assert torch.equal(full, static)
    with torch.inference_mode():
        assert torch.allclose(full, tiny.model(ids)[0], atol=1e-5)


class BandedReference(KVCache):
    """Keeps every key and applies a band mask built directly from a [T, S] index grid."""

    def __init__(self, window):
        self.window, self.k, self.v = window, {}, {}

    def attend(self, layer, q, k, v, positions):
        self.k[layer] = torch.cat([self.k[layer], k], 2) if layer in self.k else k
        self.v[layer] = torch.cat([self.v[layer], v], 2) if layer in self.v else v
        S, T = self.k[layer].shape[2], q.shape[2]
        i, j = torch.arange(S - T, S)[:, None], torch.arange(S)[None]
        band = (j <= i) & (j > i - self.window)
        return F.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=band, enable_gqa=True)


@pytest.mark.parametrize("chunk", [1, 7, 32])
def test_sliding_window_equals_banded_mask(tiny, ids, chunk):
    ref = run_chunks(tiny.model, ids, BandedReference(20), 1)
    cache = make_cache("window", tiny.model, budget=20)
    got = run_chunks(tiny.model, ids, cache, chunk)
    assert torch.allclose(got, ref, atol=1e-5)
    assert cache.num_tokens() <= 20 - 1 + chunk  # evicted: only what the next queries can see is stored


class LiteralStreamingLLM(KVCache):
    """StreamingLLM as the paper's code does it, one token at a time: keys stored without rotation, re-rotated to
    their slot in the cache every step, the query rotated to the last slot."""

    def __init__(self, inv_freq, sinks, recent):
        self.inv_freq, self.sinks, self.recent, self.k, self.v = inv_freq, sinks, recent, {}, {}

    def rope(self, x, pos, sign=1.0):
        freqs = torch.as_tensor(pos, dtype=torch.float32)[None, :, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        return apply_rope(x, emb.cos(), sign * emb.sin())

    def attend(self, layer, q, k, v, positions):
        p = int(positions[0, 0])
        k = self.rope(k, [p], -1.0)  # undo the absolute rotation: RoPE by -p inverts RoPE by p
        ks = torch.cat([self.k[layer], k], 2) if layer in self.k else k
        vs = torch.cat([self.v[layer], v], 2) if layer in self.v else v
        if ks.shape[2] > self.sinks + self.recent:
            keep = list(range(self.sinks)) + list(range(ks.shape[2] - self.recent, ks.shape[2]))
            ks, vs = ks[:, :, keep], vs[:, :, keep]
        self.k[layer], self.v[layer] = ks, vs
        n = ks.shape[2]
        q = self.rope(self.rope(q, [p], -1.0), [n - 1])
        return F.scaled_dot_product_attention(q, self.rope(ks, list(range(n))), vs, enable_gqa=True)


@pytest.mark.parametrize("chunk", [1, 5, 32])
def test_streaming_llm_equals_literal_reference(tiny, ids, chunk):
    ref = run_chunks(tiny.model, ids, LiteralStreamingLLM(tiny.model.inv_freq, 4, 16), 1)
    cache = make_cache("streaming", tiny.model, budget=20, sinks=4)
    got = run_chunks(tiny.model, ids, cache, chunk)
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(got, run_chunks(tiny.model, ids, make_cache("window", tiny.model, budget=20), 1),
                              atol=1e-4)  # the sinks matter
    assert sorted(cache.key_pos[0][0].tolist())[:4] == [0, 1, 2, 3]


def test_rotate_composes_with_rope(tiny):
    q = torch.randn(1, 2, 3, 16)
    inv = tiny.model.inv_freq
    at = lambda x, p: LiteralStreamingLLM(inv, 0, 0).rope(x, p)  # noqa: E731
    assert torch.allclose(rotate(at(q, [10, 11, 12]), torch.tensor([[-7, -7, -7]]), inv), at(q, [3, 4, 5]),
                          atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4])
def test_h2o_keeps_exactly_the_budget(tiny, ids, chunk):
    cache = H2OCache(tiny.model.config.num_layers, budget=24, recent=8)
    with torch.inference_mode():
        for s in range(0, ids.shape[1], chunk):
            n = min(s + chunk, ids.shape[1])
            tiny.model(ids[:, s:n], torch.arange(s, n)[None], cache)
            for layer in range(tiny.model.config.num_layers):
                assert cache.num_tokens(layer) == min(n, 24)
                kept = cache.key_pos[layer]  # [B, Hkv, S]: each KV head keeps its own set
                for pos in range(max(0, n - 8), n):  # the recent window is always there
                    assert (kept == pos).any(dim=-1).all()
                assert all(len(set(h.tolist())) == h.numel() for h in kept[0])  # no duplicates


def test_h2o_scores_are_accumulated_attention(tiny, ids):
    """Without eviction, each key's score is the total softmax weight it received from every query head."""
    cache = H2OCache(tiny.model.config.num_layers, budget=1000)
    run_chunks(tiny.model, ids[:, :12], cache, 4)
    q_weights = {}

    class Spy(StaticKVCache):
        def attend(self, layer, q, k, v, positions):
            keys, values, key_pos = self.update(layer, k, v, positions)
            s = (q @ keys.repeat_interleave(2, 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
            s = s.masked_fill(~causal_mask(positions, key_pos), float("-inf")).softmax(-1)
            q_weights[layer] = s.sum(2).view(1, 2, 2, -1).sum(2)  # sum over queries, then over each group's heads
            return attention(q, keys, values, causal_mask(positions, key_pos))

    with torch.inference_mode():
        tiny.model(ids[:, :12], None, Spy.for_model(tiny.model, 1, 12))
    for layer in range(tiny.model.config.num_layers):
        assert torch.allclose(cache.scores[layer], q_weights[layer], atol=1e-5)


@pytest.mark.parametrize("bits, qmax", [(8, 127), (4, 7)])
def test_quantize_error_bound(bits, qmax):
    x = torch.randn(2, 3, 50, 64) * torch.rand(2, 3, 50, 1) * 10
    codes, scale = quantize(x, bits)
    assert codes.shape[-1] == 64 * bits // 8
    err = (dequantize(codes, scale, bits, torch.float32) - x).abs()
    absmax = x.abs().amax(-1, keepdim=True)
    # Half a step, plus the float16 rounding of the scale (relative 2^-11) times the largest code.
    assert (err <= absmax / (2 * qmax) + absmax * 2**-11 + 1e-6).all()


TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital of "
        "Germany. In 1969, Apollo 11 landed on the moon, and two astronauts walked on its surface.")


def test_quantized_cache_close_to_float_cache(smollm):
    model = smollm.model
    ids = torch.tensor([smollm.tokenizer(TEXT).input_ids])
    ref = run_chunks(model, ids, make_cache("full", model), 16)
    # Stated bounds on the total variation between next-token distributions with the quantized and the float
    # cache (SmolLM2-135M, this text): int8 mean < 0.03, max < 0.1; int4 (per-token scales) is far lossier.
    for policy, mean_tv, max_tv in (("int8", 0.03, 0.1), ("int4", 0.5, 1.0)):
        got = run_chunks(model, ids, make_cache(policy, model, max_len=ids.shape[1]), 16)
        tv = 0.5 * (got.softmax(-1) - ref.softmax(-1)).abs().sum(-1)
        assert tv.mean() < mean_tv and tv.max() < max_tv, (policy, tv.mean(), tv.max())
