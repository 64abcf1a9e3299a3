"""Sampling: the filters keep the right tokens, seeds reproduce, EOS and max_tokens stop."""
import torch

from core.generate import SamplingParams, generate, probabilities, sample


def test_top_k_keeps_k_most_likely():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0] > 0).tolist() == [False, True, False, True, False]
    assert torch.allclose(p.sum(), torch.tensor(1.0))


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    p = probabilities(probs.log(), SamplingParams(temperature=1.0, top_p=0.7))
    assert (p[0] > 0).tolist() == [True, True, False, False]
    assert torch.allclose(p[0, :2], torch.tensor([0.625, 0.375]))


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


def test_seed_reproduces_and_differs(tiny):
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True)
    a = generate(tiny.model, [[1, 2, 3]], p).tokens
    b = generate(tiny.model, [[1, 2, 3]], p).tokens
    c = generate(tiny.model, [[1, 2, 3]], SamplingParams(max_tokens=20, temperature=1.0, seed=4,
                                                          ignore_eos=True)).tokens
    assert a == b and a != c


def test_stops_on_eos(smollm):
    from core.generate import chat_prompt

    ids = chat_prompt(smollm.tokenizer, "What is the capital of France?")
    out = generate(smollm.model, [ids], SamplingParams(max_tokens=60)).tokens[0]
    assert out[-1] in smollm.model.config.eos_ids and len(out) < 60
    assert "Paris" in smollm.tokenizer.decode(out)
