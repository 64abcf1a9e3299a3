"""LLMLingua-style compression: scores equal token-by-token log-probabilities, the kept tokens are the most
informative ones in their original order, bad input is one line."""
import math
import subprocess
import sys

import pytest
import torch

from kvcache.prompt_compression import answer_nll, compress, random_drop, self_information


@pytest.fixture(scope="module")
def ids(tiny):
    return torch.randint(0, tiny.model.config.vocab_size, (30,), generator=torch.Generator().manual_seed(1)).tolist()


def test_self_information_equals_prefix_by_prefix(tiny, ids):
    info = self_information(tiny.model, ids)
    assert info.shape == (len(ids),) and info[0] == math.inf
    with torch.inference_mode():
        for i in range(1, len(ids)):
            logp = tiny.model(torch.tensor([ids[:i]]))[0, -1].log_softmax(-1)[ids[i]]
            assert math.isclose(info[i].item(), -logp.item(), rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.33, 0.01])
def test_compress_keeps_most_informative_in_order(tiny, ids, ratio):
    info = self_information(tiny.model, ids)
    idx = info.topk(math.ceil(ratio * len(ids))).indices.sort().values.tolist()
    kept = compress(tiny.model, ids, ratio)
    assert kept == [ids[i] for i in idx]
    assert len(kept) == max(1, math.ceil(ratio * len(ids))) and kept[0] == ids[0]
    dropped = sorted(set(range(len(ids))) - set(idx))
    if dropped:
        assert info[idx].min() >= info[dropped].max()
    if ratio == 1.0:
        assert kept == ids


def test_random_drop_is_an_ordered_subsequence(ids):
    kept = random_drop(ids, 0.5, torch.Generator().manual_seed(0))
    assert len(kept) == 15
    it = iter(ids)
    assert all(t in it for t in kept)  # consumes `it`: an ordered subsequence


def test_answer_nll_equals_cross_entropy(tiny, ids):
    prompt, answer = ids[:20], ids[20:]
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([ids]))[0]
    ref = torch.nn.functional.cross_entropy(logits[19:-1], torch.tensor(answer)).item()
    assert math.isclose(answer_nll(tiny.model, prompt, answer), ref, rel_tol=1e-5)


def test_bad_ratio_is_one_line():
    r = subprocess.run([sys.executable, "-m", "kvcache.prompt_compression", "--ratios", "0.5,2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: every ratio must be in (0, 1]")
    assert "Traceback" not in r.stderr
