"""Teaching scripts and benchmark entry points of the engines chapter, on the tiny model: the static policy really
is static, paging wastes less than a block per sequence, prefix caching hits, and the GPU bench's code path runs."""
import json
import os
import subprocess
import sys

import pytest

from core.loading import load_model
from engines.ours import LLMEngine
from engines.teaching import kv_fragmentation, prefix_caching, static_vs_continuous
from engines.teaching.drive import drive

from benchmarks.workloads import build_workload


@pytest.fixture(scope="module")
def tiny_lm():
    return load_model("tiny", "cpu", "float32", random_weights=True)


def test_static_policy_admits_a_batch_only_after_the_last_one_finished(tiny_lm):
    specs = build_workload(tiny_lm.tokenizer, "random", 6, input_len=12, output_len=5, range_ratio=0.5)
    for i, s in enumerate(specs):
        s.output_len = 2 + 3 * i  # ragged replies: the batch shrinks before it ends
    engine = LLMEngine(tiny_lm, max_num_seqs=4, num_kv_blocks=64, max_model_len=64)
    running = []
    records, _ = drive(engine, specs, static_batch_size=2, on_step=lambda e: running.append(
        sorted(int(s.request_id) for s in e.scheduler.running)))
    assert [r.output_len for r in records] == [s.output_len for s in specs]
    batches = [ids for ids in running if ids]
    assert all(len(ids) <= 2 for ids in batches)
    # once a later batch has started, no earlier request runs again
    for a, b in zip(batches, batches[1:]):
        assert min(b) >= min(a)
    assert engine.block_manager.num_free_blocks == 64


def test_paged_waste_is_under_one_block_per_sequence(tiny_lm):
    specs = build_workload(tiny_lm.tokenizer, "random", 5, input_len=20, output_len=9, range_ratio=0.5)
    engine = LLMEngine(tiny_lm, max_num_seqs=5, block_size=8, num_kv_blocks=64, max_model_len=64)

    def check(e):
        for s in e.scheduler.running:
            assert 0 <= len(s.block_table) * 8 - s.num_computed_tokens < 8

    drive(engine, specs, on_step=check)


def test_reserved_slots_and_fit_by_hand():
    lengths = [1, 16, 17, 100]
    assert kv_fragmentation.reserved_slots(lengths, 16, 128) == 16 + 16 + 32 + 112
    assert kv_fragmentation.reserved_slots(lengths, None, 128) == 4 * 128
    assert kv_fragmentation.reserved_slots(lengths, 1, 128) == sum(lengths)
    assert kv_fragmentation.sequences_that_fit(lengths, None, 128, 300) == 2
    assert kv_fragmentation.sequences_that_fit(lengths, 16, 128, 64) == 3


def test_scripts_run_and_write_json(tmp_path):
    common = ["--model", "tiny", "--device", "cpu"]
    static_vs_continuous.main(common + ["--num-prompts", "4", "--max-num-seqs", "2", "--max-output-len", "6",
                                        "--out", str(tmp_path / "svc.json")])
    svc = json.loads((tmp_path / "svc.json").read_text())
    assert set(svc["medians"]) == {"static", "continuous"}
    kv_fragmentation.main(common + ["--num-prompts", "50", "--engine-prompts", "3", "--engine-max-tokens", "8",
                                    "--out", str(tmp_path / "frag.json")])
    frag = json.loads((tmp_path / "frag.json").read_text())
    waste = {r["block_size"]: r["waste"] for r in frag["from_lengths"]}
    assert waste[1] == 0 and waste[None] > waste[64] > waste[16] > waste[1]
    assert frag["measured_in_engine"]["paged_waste"] < frag["measured_in_engine"]["contiguous_waste"]
    prefix_caching.main(common + ["--num-prompts", "6", "--prefix-len", "64", "--input-len", "8", "--output-len",
                                  "3", "--max-num-seqs", "2", "--out", str(tmp_path / "prefix.json")])
    prefix = json.loads((tmp_path / "prefix.json").read_text())["results"]
    assert prefix["off"]["hit_rate"] == 0 and prefix["on"]["hit_rate"] > 0.5
    assert prefix["on"]["prompt_tokens_computed"] < prefix["off"]["prompt_tokens_computed"]


def test_gpu_bench_code_path_on_cpu(tmp_path):
    """As on the GPU machine: no tokenizer files anywhere (random weights, token-id prompts)."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "LLMIP_CACHE": str(tmp_path / "empty"), "LLMIP_SMOLLM2_GGUF": str(tmp_path / "no.gguf")}
    proc = subprocess.run([sys.executable, "-m", "engines.gpu_bench", "--engines", "ours", "--device", "cpu",
                           "--models", "tiny", "--dtype", "float32", "--num-requests", "6", "--input-len", "16",
                           "--output-len", "6", "--batch1-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["output_tokens"] == 36 and row["output_throughput"] > 0 and row["batch1_ms_per_token"] > 0
    # On a CPU both paths attend the reference way; the fast one's layers are compiled, which rounds differently.
    assert row["fast_vs_reference_logit_error"] < 1e-5


@pytest.mark.parametrize("argv,message", [
    (["-m", "engines.gpu_bench", "--engines", "foo"], "--engines takes"),
    (["-m", "engines.gpu_bench", "--models", "nope"], "unknown model shape"),
    (["-m", "engines.cpu_bench", "--engines", "foo"], "--engines takes"),
    (["-m", "engines.teaching.kv_fragmentation", "--block-sizes", "x"], "--block-sizes takes"),
    (["-m", "engines.cpu_linear_bench", "--model", "nope"], "unknown model"),
    (["-m", "engines.cpu_linear_bench", "--rows", "0"], "at least 1"),
])
def test_bad_arguments_give_one_clear_line(argv, message):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]
