"""Pipeline parallelism over gloo process groups generates exactly what one process generates."""
import pytest
import torch

from core.generate import SamplingParams, chat_prompt, generate
from parallelism.comm import run_local
from parallelism.pipeline_parallel import bubble_fraction, pp_generate, render_timeline

TINY_PROMPTS = [[1, 17, 300, 4000, 25, 9], [1, 500, 77], [1, 8, 9, 10]]


def run_cases(cases):
    """Inside one process group: pp_generate(*args) for every case, in order."""
    return [pp_generate(*args) for args in cases]


def reference(model, prompts, max_tokens):
    logits = []
    hook = model.register_forward_hook(lambda _m, _i, out: logits.append(out[:, -1].float()))
    try:
        result = generate(model, prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        hook.remove()
    return result.tokens, torch.stack(logits)


def assert_matches_row_by_row(lm, prompts, max_tokens, stages):
    """Micro-batches of one prompt each: compare every row with the single-process run of that prompt alone (the
    same padding). Only the last stage holds tokens and logits."""
    last = stages[-1]
    for row, prompt in enumerate(prompts):
        tokens, logits = reference(lm.model, [prompt], max_tokens)
        assert last["tokens"][row] == tokens[0]
        torch.testing.assert_close(last["logits"][:, row], logits[:, 0], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm_prompts(smollm):
    return [chat_prompt(smollm.tokenizer, "What is the capital of France?"),
            chat_prompt(smollm.tokenizer, "Name three colours.")]


@pytest.fixture(scope="module")
def pp2(smollm_prompts):
    """Cases run by 2 stages: tiny in 1 and in 3 micro-batches, the default model in 2 micro-batches."""
    per_rank = run_local(run_cases, 2, [("tiny", TINY_PROMPTS, 10, 1), ("tiny", TINY_PROMPTS, 10, 3),
                                        ("smollm2-135m", smollm_prompts, 8, 2)])
    return list(zip(*per_rank))  # case -> [stage 0 result, stage 1 result]


def test_tiny_pp2_one_microbatch_exact(tiny, pp2):
    stages = pp2[0]
    assert [s["layers"] for s in stages] == [[0, 1], [1, 2]]
    assert "tokens" not in stages[0]
    tokens, logits = reference(tiny.model, TINY_PROMPTS, 10)  # one micro-batch: the same padding as the reference
    assert stages[1]["tokens"] == tokens
    torch.testing.assert_close(stages[1]["logits"], logits, rtol=1e-4, atol=1e-4)


def test_tiny_pp2_three_microbatches_exact(tiny, pp2):
    assert_matches_row_by_row(tiny, TINY_PROMPTS, 10, pp2[1])


def test_default_model_pp2_exact(smollm, smollm_prompts, pp2):
    stages = pp2[2]
    assert [s["layers"] for s in stages] == [[0, 15], [15, 30]]
    assert_matches_row_by_row(smollm, smollm_prompts, 8, stages)


def test_every_stage_runs_every_microbatch_every_step(pp2):
    for stage in pp2[1]:
        assert sorted((step, m) for _, _, step, m in stage["busy"]) == [(s, m) for s in range(10) for m in range(3)]


def test_bubble_fraction_and_timeline():
    # Two stages, two micro-batches of 1 s each, perfectly staggered: stage 1 idles during the first second,
    # stage 0 during the last, so 2 of 6 stage-seconds are idle.
    timelines = [[(0, 1, 0, 0), (1, 2, 0, 1)], [(1, 2, 0, 0), (2, 3, 0, 1)]]
    assert bubble_fraction(timelines) == pytest.approx(1 / 3)
    rows = render_timeline(timelines, width=6).splitlines()
    assert rows[0] == "stage 0 |AABB..|"
    assert rows[1] == "stage 1 |..AABB|"
