"""ShareGPT splits are disjoint and fixed; workloads and perplexity behave."""
import math

import torch
import torch.nn.functional as F

from core import data
from core.perplexity import perplexity


def test_splits_disjoint_and_stable():
    ids = {s: {c["id"] for c in data.conversations(s)} for s in data.SPLITS}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not ids[a] & ids[b]
    total = sum(len(v) for v in ids.values())
    assert total == len(data._all_conversations()) > 10_000
    assert data.split_of("QWJhYvA_0") == data.split_of("QWJhYvA_0")
    assert abs(len(ids["evaluation"]) / total - 0.10) < 0.02


def test_sharegpt_requests_respect_limits(smollm):
    reqs = data.sharegpt_requests(smollm.tokenizer, 30, max_input_len=256, max_total_len=512, seed=1)
    assert len(reqs) == 30
    for r in reqs:
        assert 4 <= r.prompt_len <= 256 and r.prompt_len + r.output_len <= 512
        assert len(smollm.tokenizer(r.prompt).input_ids) == r.prompt_len
    again = data.sharegpt_requests(smollm.tokenizer, 30, max_input_len=256, max_total_len=512, seed=1)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]


def test_perplexity_equals_full_context_loss_when_window_covers_text(tiny):
    ids = torch.randint(0, 1000, (200,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny.model(ids[None])[0, :-1]
    expected = math.exp(F.cross_entropy(logits, ids[1:]).item())
    assert math.isclose(perplexity(tiny.model, ids, window=256, stride=128, progress=False), expected, rel_tol=1e-5)


def test_perplexity_sliding_window_scores_every_token_once(tiny):
    ids = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(1))
    # window 128, stride 64: (begin, end, first token this window scores)
    windows = [(0, 128, 1), (64, 192, 128), (128, 256, 192), (192, 300, 256)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in windows:
            logits = tiny.model(ids[None, begin:end])[0, :-1]
            new = end - first
            nll += F.cross_entropy(logits[-new:], ids[first:end], reduction="sum").item()
            count += new
    assert count == 299
    got = perplexity(tiny.model, ids, window=128, stride=64, progress=False)
    assert math.isclose(got, math.exp(nll / count), rel_tol=1e-5)
