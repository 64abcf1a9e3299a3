"""End to end: sampled speculative decoding with a draft model draws sequences from the target's own distribution.

The target (tiny model) and its one-layer shallow draft disagree at temperature 0.3 with top-k 4 after this prompt
(accepting every draft token would move the law by a total variation of 0.44), so a wrong acceptance rule shows up as
a large distance between the sampled 3-token sequences and the exact law of the target, computed by enumerating the
4 x 4 x 4 sequences its top-k allows.
"""
import itertools

import pytest
import torch

import speculative.common as common
from core.generate import SamplingParams, probabilities
from speculative.draft import run_draft, shallow_draft

PROMPT = [5, 6, 7, 8]
PARAMS = dict(max_tokens=3, temperature=0.3, top_k=4, ignore_eos=True)


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny-model runs: a second thread only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _target_law(model) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) of plain sampling from the target, exactly."""
    p = SamplingParams(**PARAMS)
    law = {(): 1.0}
    with torch.inference_mode():
        for _ in range(3):
            nxt = {}
            for seq, mass in law.items():
                probs = probabilities(model(torch.tensor([PROMPT + list(seq)]))[0, -1][None], p)[0]
                for t in probs.nonzero()[:, 0].tolist():
                    nxt[seq + (t,)] = mass * float(probs[t])
            law = nxt
    return law


def _tv_of_speculative(model, draft, n: int) -> float:
    law = _target_law(model)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(n):
        seq = tuple(run_draft(model, draft, PROMPT, SamplingParams(**PARAMS, seed=seed), k=2).tokens)
        counts[seq] = counts.get(seq, 0) + 1
    cells = set(law) | set(counts)
    return 0.5 * sum(abs(counts.get(c, 0) / n - law.get(c, 0.0)) for c in cells)


def _accept_always(draft, q, p, generator=None):
    return draft + [int(torch.multinomial(p[len(draft)], 1, generator=generator))], len(draft)


def test_speculative_sampling_matches_target_law(tiny, monkeypatch):
    model = tiny.model
    draft = shallow_draft(model, [0])
    # 600 sequences over at most 64 cells: sampling noise alone gives a TV of about 0.06.
    assert _tv_of_speculative(model, draft, 600) < 0.13
    # The same test catches a wrong rule: accepting every draft token (true TV 0.44).
    monkeypatch.setattr(common, "speculative_sample", _accept_always)
    assert _tv_of_speculative(model, draft, 150) > 0.25


def test_enumeration_is_a_distribution(tiny):
    law = _target_law(tiny.model)
    assert len(law) == 64 and abs(sum(law.values()) - 1.0) < 1e-5
    assert all(len(s) == 3 for s in itertools.islice(law, 5))
