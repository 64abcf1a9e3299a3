"""Tensor parallelism over gloo process groups generates exactly what one process generates."""
import pytest
import torch

from core.errors import UserError
from core.generate import SamplingParams, chat_prompt, generate
from parallelism.comm import run_local
from parallelism.tensor_parallel import head_layout, tp_generate


def reference(model, prompts, max_tokens):
    """Greedy tokens and the last-position logits of every forward pass of the unsharded model."""
    logits = []
    hook = model.register_forward_hook(lambda _m, _i, out: logits.append(out[:, -1].float()))
    try:
        result = generate(model, prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        hook.remove()
    return result.tokens, torch.stack(logits)


def check(lm, name, prompts, max_tokens, world, vocab_parallel=False):
    tokens, logits = reference(lm.model, prompts, max_tokens)
    results = run_local(tp_generate, world, name, prompts, max_tokens, vocab_parallel)
    for r in results:  # every rank holds the full answer
        assert r["tokens"] == tokens
        torch.testing.assert_close(r["logits"], logits, rtol=1e-4, atol=1e-4)
    return results


TINY_PROMPTS = [[1, 17, 300, 4000, 25, 9], [1, 500, 77]]


def test_tiny_tp2_exact(tiny):
    results = check(tiny, "tiny", TINY_PROMPTS, 12, 2)
    assert [r["local_heads"] for r in results] == [[2, 1], [2, 1]]


def test_tiny_tp4_replicates_kv_heads(tiny):
    results = check(tiny, "tiny", TINY_PROMPTS, 8, 4)
    assert [r["local_heads"] for r in results] == [[1, 1]] * 4  # 4 ranks, 2 KV heads: each KV head twice


def test_tiny_tp2_vocab_parallel(tiny):
    check(tiny, "tiny", TINY_PROMPTS, 8, 2, vocab_parallel=True)


def test_default_model_tp3_exact(smollm):
    prompts = [chat_prompt(smollm.tokenizer, "What is the capital of France?")]
    results = check(smollm, "smollm2-135m", prompts, 16, 3)
    assert [r["local_heads"] for r in results] == [[3, 1]] * 3


def test_default_model_tp2_uneven_heads_exact(smollm):
    prompts = [chat_prompt(smollm.tokenizer, "Name three colours.")]
    results = check(smollm, "smollm2-135m", prompts, 16, 2)
    assert sorted(r["local_heads"][0] for r in results) == [3, 6]  # 3 KV groups of 3 over 2 ranks


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
