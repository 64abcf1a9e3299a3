"""Tensor parallelism over gloo process groups generates exactly what one process generates.

Each process group is started once per module (spawning and importing torch dominates the cost) and runs several
cases; the tests then compare each case with the unsharded model.
"""
import pytest
import torch

from core.errors import UserError
from core.generate import SamplingParams, chat_prompt, generate
from parallelism.comm import run_local
from parallelism.tensor_parallel import head_layout, tp_generate

TINY_PROMPTS = [[1, 17, 300, 4000, 25, 9], [1, 500, 77]]


def run_cases(cases):
    """Inside one process group: tp_generate(*args) for every case, in order."""
    return [tp_generate(*args) for args in cases]


def reference(model, prompts, max_tokens):
    """Greedy tokens and the last-position logits of every forward pass of the unsharded model."""
    logits = []
    hook = model.register_forward_hook(lambda _m, _i, out: logits.append(out[:, -1].float()))
    try:
        result = generate(model, prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        hook.remove()
    return result.tokens, torch.stack(logits)


def assert_matches(lm, prompts, max_tokens, results):
    tokens, logits = reference(lm.model, prompts, max_tokens)
    for r in results:  # every rank holds the full answer
        assert r["tokens"] == tokens
        torch.testing.assert_close(r["logits"], logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm_prompts(smollm):
    return [chat_prompt(smollm.tokenizer, "What is the capital of France?"),
            chat_prompt(smollm.tokenizer, "Name three colours.")]


@pytest.fixture(scope="module")
def tp2(smollm_prompts):
    """Cases run by 2 ranks: tiny (counting its all-reduces), tiny with vocab-parallel embedding/LM head, default model (uneven heads)."""
    per_rank = run_local(run_cases, 2, [("tiny", TINY_PROMPTS, 12, False, "cpu", "float32", False, True),
                                        ("tiny", TINY_PROMPTS, 8, True),
                                        ("smollm2-135m", smollm_prompts, 8)])
    return list(zip(*per_rank))  # case -> [rank 0 result, rank 1 result]


def test_tiny_tp2_exact(tiny, tp2):
    assert_matches(tiny, TINY_PROMPTS, 12, tp2[0])
    assert [r["local_heads"] for r in tp2[0]] == [[2, 1], [2, 1]]


def test_tiny_tp2_vocab_parallel_exact(tiny, tp2):
    assert_matches(tiny, TINY_PROMPTS, 8, tp2[1])


def test_default_model_tp2_uneven_heads_exact(smollm, smollm_prompts, tp2):
    assert_matches(smollm, smollm_prompts, 8, tp2[2])
    assert sorted(r["local_heads"][0] for r in tp2[2]) == [3, 6]  # 3 KV groups of 3 query heads over 2 ranks


def test_default_model_tp3_exact(smollm, smollm_prompts):
    results = run_local(tp_generate, 3, "smollm2-135m", smollm_prompts[:1], 8)
    assert_matches(smollm, smollm_prompts[:1], 8, results)
    assert [r["local_heads"] for r in results] == [[3, 1]] * 3


def test_tiny_tp4_replicates_kv_heads(tiny):
    results = run_local(tp_generate, 4, "tiny", TINY_PROMPTS, 8)
    assert_matches(tiny, TINY_PROMPTS, 8, results)
    assert [r["local_heads"] for r in results] == [[1, 1]] * 4  # 4 ranks, 2 KV heads: each KV head twice


def test_decode_issues_two_all_reduces_per_layer(tiny, tp2):
    r = tp2[0][0]
    hidden = tiny.model.config.hidden_size
    assert r["decode_allreduce_per_token"] == 2 * tiny.model.config.num_layers
    assert r["decode_allreduce_bytes_per_token"] == 2 * tiny.model.config.num_layers * len(TINY_PROMPTS) * hidden * 4


@pytest.mark.parametrize("heads,kv,world", [(9, 3, 2), (9, 3, 3), (9, 3, 6), (9, 3, 9), (4, 2, 4), (64, 8, 8),
                                            (14, 2, 4), (32, 8, 3)])
def test_head_layout_covers_every_head_with_its_kv_head(heads, kv, world):
    seen = []
    for rank in range(world):
        q, k = head_layout(heads, kv, world, rank)
        assert len(q) % len(k) == 0
        g = len(q) // len(k)
        for i, h in enumerate(q):  # local grouped-query mapping reads the right global KV head
            assert k[i // g] == h // (heads // kv)
        seen += q
    assert seen == list(range(heads))


def test_head_layout_rejects_more_ranks_than_heads():
    with pytest.raises(UserError):
        head_layout(4, 2, 5, 0)
