"""The vLLM scripts with the CPU build and the default model: offline greedy tokens equal core.generate's in
float32; the served script launches vLLM's server, queries it with the openai client, drives it with the harness
and reports every request completed. Also the TensorRT-LLM script's one-line error where it is not installed."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def run_module(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    # vLLM spawns engine processes: a fresh interpreter per run keeps them out of the test process.
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})


@needs_vllm
@pytest.mark.slow
def test_offline_float32_matches_core_generate(tmp_path):
    out = tmp_path / "offline.json"
    r = run_module(["engines.vllm.offline", "--dtype", "float32", "--num-prompts", "3", "--max-tokens", "12",
                    "--max-model-len", "512", "--enforce-eager", "--out", str(out)], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dtype"] == "float32" and len(result["outputs"]) == 3
    for row in result["outputs"]:
        assert row["num_tokens"] > 0 and row["agree_tokens"] == row["reference_tokens"] == row["num_tokens"], row
    assert "Paris" in result["outputs"][0]["text"]


def test_offline_bad_arguments_exit_2():
    r = run_module(["engines.vllm.offline", "--num-prompts", "0"], timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ")


@needs_vllm
@pytest.mark.slow
def test_serve_vllm_driven_by_harness(tmp_path):
    r = run_module(["engines.vllm.serve", "--engines", "vllm", "--enforce-eager", "--max-model-len", "512",
                    "--max-num-seqs", "8", "--num-prompts", "4", "--random-input-len", "32", "--random-output-len",
                    "8", "--no-progress", "--log-dir", str(tmp_path), "--result-dir", str(tmp_path)], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "completion: " in r.stdout and "streamed chat: " in r.stdout  # repr may quote with " or '
    result = json.loads((tmp_path / "vllm-rateinf.json").read_text())
    assert result["completed"] == 4 and result["failed"] == 0


def test_serve_rejects_options_vllm_only_for_ours():
    r = run_module(["engines.vllm.serve", "--engines", "ours", "--tensor-parallel-size", "2"], timeout=120)
    assert r.returncode == 2 and "vLLM only" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="TensorRT-LLM is installed")
def test_tensorrt_llm_script_says_it_is_missing():
    r = run_module(["engines.tensorrt_llm.generate"], timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: TensorRT-LLM is not installed")
    assert len(r.stderr.strip().splitlines()) == 1
