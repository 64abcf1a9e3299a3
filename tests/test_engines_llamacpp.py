"""llama.cpp through llama-cpp-python on the default model's GGUF: its next-token logits match our dequantized
model's, greedy tokens agree wherever the top choice is not a near-tie, and its OpenAI server serves the harness.
llama-cpp-python builds from source (over 30 minutes on this shared 2-core machine): these skip without it."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from engines.llamacpp.offline import main as offline_main  # noqa: E402


def test_offline_agrees_with_core_model(tmp_path):
    out = tmp_path / "llamacpp.json"
    result = offline_main(["--max-tokens", "4", "--num-prompts", "2", "--n-ctx", "256", "--out", str(out)])
    assert json.loads(out.read_text())["outputs"] == result["outputs"]
    for row in result["outputs"]:
        assert row["num_tokens"] > 0 and row["text"]
        # Same weights, 4-bit arithmetic: the logits move a little, so only a near-tie may change the first token.
        assert row["logits_corr"] > 0.99, row
        if row["our_top2_gap"] > 0.5:
            assert row["same_top1"] and row["agree_tokens"] >= 1, row


def test_offline_rejects_a_non_gguf_model():
    r = subprocess.run([sys.executable, "-m", "engines.llamacpp.offline", "--model", "/tmp"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "not a .gguf file" in r.stderr


@pytest.mark.slow
def test_llamacpp_server_driven_by_harness(tmp_path):
    pytest.importorskip("sse_starlette", reason="llama-cpp-python[server] extras are not installed")
    r = subprocess.run([sys.executable, "-m", "engines.llamacpp.serve", "--num-prompts", "3", "--random-input-len",
                        "16", "--random-output-len", "4", "--max-model-len", "256", "--no-progress", "--log-dir",
                        str(tmp_path), "--result-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "llamacpp-rateinf.json").read_text())
    assert result["completed"] == 3 and result["failed"] == 0
