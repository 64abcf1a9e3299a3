"""Prompt lookup and lookahead decoding: greedy output equals plain greedy decoding of the target."""
import pytest

from core.errors import UserError
from core.generate import SamplingParams, chat_prompt, generate
from speculative.common import speculative_generate
from speculative.lookahead import LookaheadProposer, run_lookahead
from speculative.prompt_lookup import PromptLookupProposer, run_prompt_lookup

PROMPTS = ["Fix the grammar of this sentence: me and him goes to the store yesterday and buyed three apple.",
           "List the days of the week."]


def test_prompt_lookup_proposes_continuation_of_latest_match():
    propose = PromptLookupProposer(prompt_lookup_max=2, prompt_lookup_min=1)
    assert propose([5, 6, 7, 8, 5, 6, 9, 1, 5, 6], 3) == ([9, 1, 5], None)  # latest match of (5, 6)
    assert propose([1, 2, 3, 4], 3) == ([], None)  # no earlier occurrence of 4
    assert propose([1, 2, 3, 2], 5) == ([3, 2], None)  # falls back to the 1-gram (2,)
    with pytest.raises(UserError):
        PromptLookupProposer(1, 2)


def test_lookahead_pool_collects_ngrams():
    la = LookaheadProposer(window_size=3, ngram_size=3)
    assert la([4, 5, 6], 5) == ([4, 5, 6], None)  # first window: the prompt's tail
    la.observe([4, 5, 6], [9, 8, 7, 6], accepted=0)
    assert la.pool[9] == [(8, 7)] and la.pool[8] == [(7, 6)]
    assert la.window == [8, 7, 6]
    assert la([1, 9], 4) == ([8, 7, 8, 7], None)  # pool n-gram for 9, then the window


@pytest.mark.parametrize("method", ["prompt_lookup", "lookahead"])
def test_greedy_identical_tiny(tiny, method):
    p = SamplingParams(max_tokens=40, ignore_eos=True)
    prompt = [1, 7, 8, 9, 7, 8, 9, 7, 8]
    plain = speculative_generate(tiny.model, prompt, p).tokens
    run = run_prompt_lookup if method == "prompt_lookup" else run_lookahead
    assert run(tiny.model, prompt, p).tokens == plain


def test_greedy_identical_default_model(smollm):
    m, tok = smollm.model, smollm.tokenizer
    p = SamplingParams(max_tokens=32)
    accepted = {"prompt_lookup": 0, "lookahead": 0}
    for text in PROMPTS:
        prompt = chat_prompt(tok, text)
        plain = generate(m, [prompt], p).tokens[0]
        for name, run in [("prompt_lookup", run_prompt_lookup), ("lookahead", run_lookahead)]:
            result = run(m, prompt, p)
            assert result.tokens == plain, name
            accepted[name] += result.stats.num_accepted_tokens
    assert all(n > 0 for n in accepted.values()), accepted


def test_prompt_lookup_sampling_reproduces(tiny):
    p = SamplingParams(max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    a = run_prompt_lookup(tiny.model, [1, 7, 8, 9, 7, 8], p).tokens
    assert a == run_prompt_lookup(tiny.model, [1, 7, 8, 9, 7, 8], p).tokens and len(a) == 30
