"""The long-stream evaluation's bookkeeping: chunked scoring equals one dense pass, the recompute reference equals
core.perplexity, bad input is one line."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from core.perplexity import perplexity
from kvcache.long_stream import ppl, recompute_nll, stream_nll
from kvcache.policies import make_cache


@pytest.fixture(scope="module")
def ids(tiny):
    return torch.randint(0, tiny.model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_chunked_stream_equals_one_dense_pass(tiny, ids, chunk):
    nll, memory = stream_nll(tiny.model, ids, make_cache("full", tiny.model), chunk)
    with torch.inference_mode():
        ref = F.cross_entropy(tiny.model(ids[None])[0, :-1], ids[1:], reduction="none")
    assert len(nll) == len(ids) - 1
    assert torch.allclose(torch.tensor(nll), ref, atol=1e-4)
    assert memory[-1]["position"] == len(ids) - 1


def test_window_memory_is_flat(tiny, ids):
    _, memory = stream_nll(tiny.model, ids, make_cache("window", tiny.model, budget=32), 8)
    sizes = {m["kv_bytes"] for m in memory[10:-1]}  # the last chunk is shorter
    assert len(sizes) == 1  # once full, the cache holds budget - 1 + chunk tokens, whatever the position


def test_recompute_reference_equals_core_perplexity(tiny, ids):
    nll = recompute_nll(tiny.model, ids, window=40)
    assert len(nll) == len(ids) - 1
    assert math.isclose(ppl(nll), perplexity(tiny.model, ids, window=40, stride=20, progress=False), rel_tol=1e-5)


def test_bad_policy_is_one_line():
    r = subprocess.run([sys.executable, "-m", "kvcache.long_stream", "--policies", "lru"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown cache policy 'lru'")
    assert "Traceback" not in r.stderr


def test_cli_saved_stream_round_trip(tmp_path):
    """The GPU path: save the stream's ids once, run every policy from the file, get a table, JSON and plots."""
    from kvcache.long_stream import main

    stream, out = tmp_path / "stream.json", tmp_path / "r.json"
    base = ["--model", "tiny", "--random-weights", "--num-tokens", "200"]
    main(base + ["--save-stream", str(stream)])
    main(base + ["--stream-file", str(stream), "--budget", "64", "--chunk-size", "16", "--reference-window", "64",
                 "--policies", "full,window,streaming,h2o,int8", "--plot-dir", str(tmp_path), "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["policies"]) == {"dense recompute (64)", "full", "window", "streaming", "h2o", "int8"}
    assert all(len(p["nll"]) == 199 and math.isfinite(p["ppl_within_context"]) for p in r["policies"].values())
    assert (tmp_path / "long_stream_ppl.png").stat().st_size > 0 and (tmp_path / "long_stream_memory.png").exists()
    with pytest.raises(SystemExit):
        main(base + ["--stream-file", str(stream), "--num-tokens", "500"])  # more tokens than the file holds
