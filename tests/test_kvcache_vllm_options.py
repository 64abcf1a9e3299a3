"""vLLM options script: the workload shares its prefix, bad input is one line; end to end (slow) prefix caching
gives the baseline's greedy tokens."""
import json
import subprocess
import sys

import pytest

from kvcache.vllm_options import workload


def test_workload_shares_a_prefix(smollm):
    tok = smollm.tokenizer
    prompts = workload(tok, 3, 100)
    assert len(set(prompts)) == 3
    first = [tok(p).input_ids for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(first[0], first[1])) if a != b)
    assert shared >= 100


def test_bad_variant_is_one_line():
    r = subprocess.run([sys.executable, "-m", "kvcache.vllm_options", "--variants", "int3"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown variant 'int3'") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_prefix_caching_keeps_greedy_tokens(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "kvcache.vllm_options", "--variants", "baseline,prefix caching",
                    "--num-prompts", "2", "--prefix-len", "256", "--max-model-len", "512", "--max-tokens", "8",
                    "--out", str(out)], check=True, timeout=1200)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["variants"]}
    assert rows["prefix caching"]["tokens_equal_baseline"] == 1.0
    assert rows["baseline"]["kv_capacity_tokens"] > 0


def test_workload_from_stream_file(smollm, tmp_path):
    f = tmp_path / "s.json"
    ids = smollm.tokenizer("The quick brown fox jumps over the lazy dog. " * 30).input_ids
    f.write_text(json.dumps({"token_ids": ids}))
    prompts = workload(smollm.tokenizer, 2, 100, str(f))
    assert smollm.tokenizer.decode(ids[:100]) in prompts[0] and prompts[0] != prompts[1]
