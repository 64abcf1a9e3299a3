"""Draft-model speculative decoding: greedy output equals plain greedy; the sampling rule keeps the target's law."""
import pytest
import torch

from core.errors import UserError
from core.generate import SamplingParams, chat_prompt, generate
from speculative.common import RollbackKVCache, forward, speculative_generate, speculative_sample
from speculative.draft import parse_layers, run_draft, shallow_draft

PROMPTS = ["Write a Python function that reverses a linked list.",
           "What are three tips for staying healthy?"]


def test_plain_loop_matches_core_generate(tiny):
    p = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = [1, 5, 9, 200, 31]
    assert speculative_generate(tiny.model, prompt, p).tokens == generate(tiny.model, [prompt], p).tokens[0]


def test_rollback_cache_truncate_and_keep_match_fresh_run(tiny):
    m, ids = tiny.model, [3, 14, 15, 92, 65, 35, 89, 79]
    with torch.inference_mode():
        ref = forward(m, RollbackKVCache.for_model(m, 1, 32), ids, 0)
        cache = RollbackKVCache.for_model(m, 1, 32)
        forward(m, cache, ids[:5] + [7, 7, 7], 0)  # three wrong tokens after the first five
        cache.truncate(5)
        assert torch.allclose(forward(m, cache, ids[5:], 5), ref[5:], atol=1e-5)
        # keep: junk at slots 5..6 (positions 6, 7: invisible to position 5), the right token 5 at slot 7 (position
        # 5), then compact it to slot 5.
        cache = RollbackKVCache.for_model(m, 1, 32)
        forward(m, cache, ids[:5], 0)
        forward(m, cache, [7, 8], 6)
        forward(m, cache, [ids[5]], 5)
        cache.keep(5, torch.tensor([7]))
        assert cache.lengths[0] == 6
        assert torch.allclose(forward(m, cache, ids[6:], 6), ref[6:], atol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_identical_tiny_self_and_shallow_draft(tiny, adaptive):
    m = tiny.model
    p = SamplingParams(max_tokens=40, ignore_eos=True)
    prompt = [1, 17, 4000, 9, 9, 123]
    plain = speculative_generate(m, prompt, p).tokens
    # The target as its own draft accepts everything: exercises the bonus token and full-acceptance path.
    same = run_draft(m, m, prompt, p, k=4, adaptive=adaptive)
    assert same.tokens == plain
    assert same.stats.num_accepted_tokens == same.stats.num_draft_tokens > 0
    shallow = run_draft(m, shallow_draft(m, [0]), prompt, p, k=3, adaptive=adaptive)
    assert shallow.tokens == plain


def test_greedy_identical_default_model(smollm):
    m, tok = smollm.model, smollm.tokenizer
    draft = shallow_draft(m, parse_layers("0-7,18-29", m.config.num_layers))
    p = SamplingParams(max_tokens=32)
    accepted = 0
    for text in PROMPTS:
        prompt = chat_prompt(tok, text)
        plain = generate(m, [prompt], p).tokens[0]
        spec = run_draft(m, draft, prompt, p, k=4)
        assert spec.tokens == plain
        accepted += spec.stats.num_accepted_tokens
    assert accepted > 0  # the test must exercise acceptance, not only rejections


def _emitted_pairs(rule, p, q, n, seed=0):
    """First two tokens emitted by repeated draft-then-verify steps on a context-free target p and draft q."""
    g = torch.Generator().manual_seed(seed)
    k = 2
    pk, qk = p.expand(k + 1, -1), q.expand(k, -1)
    pairs = torch.zeros(len(p), len(p))
    for _ in range(n):
        out: list[int] = []
        while len(out) < 2:
            draft = torch.multinomial(q, k, replacement=True, generator=g).tolist()
            out += rule(draft, qk, pk, g)[0]
        pairs[out[0], out[1]] += 1
    return pairs / n


def _accept_always(draft, q, p, g):
    return draft + [int(torch.multinomial(p[-1], 1, generator=g))], len(draft)


def _resample_from_target(draft, q, p, g):
    for i, x in enumerate(draft):
        if torch.rand((), generator=g) * q[i, x] > p[i, x]:
            return draft[:i] + [int(torch.multinomial(p[i], 1, generator=g))], i
    return draft + [int(torch.multinomial(p[-1], 1, generator=g))], len(draft)


def test_sampling_rule_reproduces_target_distribution():
    p = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    q = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.3, 0.4])
    target = torch.outer(p, p)  # emitted tokens must be independent draws from p

    def tv(rule):
        return 0.5 * (_emitted_pairs(rule, p, q, 12000) - target).abs().sum().item()

    # Sampling noise of 12000 draws over 36 cells gives a TV of about 0.02; the wrong rules sit far above 0.05.
    assert tv(speculative_sample) < 0.04
    assert tv(_accept_always) > 0.1
    assert tv(_resample_from_target) > 0.08


def test_sampled_generation_runs_and_reproduces(tiny):
    m = tiny.model
    p = SamplingParams(max_tokens=30, temperature=0.9, top_k=50, seed=7, ignore_eos=True)
    a = run_draft(m, shallow_draft(m, [1]), [1, 2, 3], p, k=3)
    b = run_draft(m, shallow_draft(m, [1]), [1, 2, 3], p, k=3)
    assert a.tokens == b.tokens and len(a.tokens) == 30


def test_parse_layers():
    assert parse_layers("3", 30) == [0, 1, 2]
    assert parse_layers("0-1,28-29", 30) == [0, 1, 28, 29]
    for bad in ["0", "31", "5-3", "2,1", "a", "0-30"]:
        with pytest.raises(UserError):
            parse_layers(bad, 30)


def test_verify_cost_times_every_pass_size(tiny):
    from speculative.verify_cost import pass_times

    times = pass_times(tiny.model, [1, 5], context=16, steps=2, repeats=1)
    assert list(times) == [1, 5] and all(t > 0 for t in times.values())


def test_verify_cost_drift_is_rounding_only_in_float32(tiny):
    """A pass of T tokens computes what T one-token steps compute, up to float32 rounding (a pass that let a token
    see the ones after it, or a cache written at the wrong positions, would differ by whole logits)."""
    from speculative.verify_cost import pass_drift

    drift = pass_drift(tiny.model, [1, 5, 9], context=16)
    assert drift[1] == 0.0 and 0.0 <= drift[5] < 1e-4 and 0.0 <= drift[9] < 1e-4


@pytest.mark.parametrize("method,min_acceptance", [("int8", 0.75), ("int4", 0.3)])
def test_quantized_target_as_draft(smollm, method, min_acceptance):
    """The target's own INT8 / INT4 copy drafts for it: greedy output is plain greedy's, and the draft agrees with
    the target most of the time (here 86% of INT8 drafts, 42% of INT4 ones; a broken quantization, almost never)."""
    from speculative.draft import load_draft

    draft, label = load_draft(smollm, method, "0-3", "cpu", "float32")
    assert method.upper() in label
    p = SamplingParams(max_tokens=32)
    prompt = chat_prompt(smollm.tokenizer, PROMPTS[1])
    spec = run_draft(smollm.model, draft, prompt, p, k=4)
    assert spec.tokens == generate(smollm.model, [prompt], p).tokens[0]
    assert spec.stats.draft_acceptance_rate >= min_acceptance


def test_benchmark_runs_every_method_identically(tmp_path):
    """The chapter's benchmark end to end on the tiny model, Medusa with and without a lookup branch included:
    every row's greedy output is plain decoding's, and a bad --draft-vocab or --medusa-lookup is a one-line error."""
    import json

    from core.loading import load_model
    from speculative.benchmark import main
    from speculative.medusa import MedusaHeads, save_heads
    heads = tmp_path / "tiny.medusa.safetensors"
    save_heads(MedusaHeads(64, 4), load_model("tiny", "cpu", "float32", random_weights=True).model, "tiny", heads, "")
    out = tmp_path / "spec.json"
    args = ["--model", "tiny", "--random-weights", "--device", "cpu", "--prompts", "speculative/prompts_eval.json",
            "--num-prompts", "1", "--max-tokens", "8", "--sweep-k", "", "--draft-layers", "1",
            "--heads", str(heads), "--tree", "chain", "--medusa-lookup", "0,2"]
    main(args + ["--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"chat", "code", "edit"}
    assert {"medusa, chain tree (4)", "medusa, chain tree (4) + lookup 2"} <= set(results["chat"])
    assert all(r["identical_to_plain"] for kind in results.values() for r in kind.values())
    for bad in (["--draft-vocab", "many"], ["--medusa-lookup", "three"]):
        with pytest.raises(SystemExit):
            main(args + bad)
