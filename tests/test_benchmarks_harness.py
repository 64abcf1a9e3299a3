"""The harness end to end on cheap targets: workloads, the CLI against the instant stub server (failures included),
result files, reports, plots, the harness's own capacity, and the in-process backends on the default model."""
import argparse
import csv
import json
import subprocess
import sys

import pytest

from benchmarks.__main__ import build_parser
from benchmarks.backends.base import RequestSpec
from benchmarks.capacity import measure
from benchmarks.cli import run
from benchmarks.plot import plot_all
from benchmarks.report import markdown_report, terminal_table
from benchmarks.results import load_results, write_atomic
from benchmarks.server import stub_server
from benchmarks.workloads import build_workload, load_workload, save_workload
from core.errors import UserError


@pytest.fixture(scope="module")
def stub():
    with stub_server(tokens=8) as (url, pid):
        yield url


def test_workloads_are_seeded_and_sized(smollm):
    tok = smollm.tokenizer
    a = build_workload(tok, "random", 6, seed=3, input_len=50, output_len=10, range_ratio=0.5)
    assert [s.prompt for s in a] == [s.prompt for s in build_workload(tok, "random", 6, seed=3, input_len=50,
                                                                       output_len=10, range_ratio=0.5)]
    assert all(20 <= s.prompt_len <= 80 and 5 <= s.output_len <= 15 and s.ignore_eos for s in a)
    assert all(s.prompt_len == len(tok(s.prompt).input_ids) for s in a)
    fixed = build_workload(tok, "fixed", 4, input_len=40, output_len=7)
    assert all(abs(s.prompt_len - 40) <= 3 and s.output_len == 7 for s in fixed)  # re-encoding may merge a token
    pre = build_workload(tok, "prefix", 4, input_len=20, output_len=5, prefix_len=60, num_prefixes=2)
    assert pre[0].prompt[:100] == pre[2].prompt[:100] != pre[1].prompt[:100]
    share = build_workload(tok, "sharegpt", 3, output_len=12, ignore_eos=False)
    assert all(s.output_len == 12 and not s.ignore_eos for s in share)
    with pytest.raises(UserError):
        build_workload(tok, "nope", 3, output_len=5)
    with pytest.raises(UserError):
        build_workload(tok, "random", 3, output_len=None)


def _run(argv):
    return run(build_parser().parse_args(["run", *argv]))


def test_cli_against_stub_writes_results_and_records_failures(stub, tmp_path, smollm, capsys):
    base = ["--backend", "openai", "--base-url", stub, "--num-prompts", "12", "--random-input-len", "16",
            "--random-output-len", "8", "--result-dir", str(tmp_path), "--no-progress", "--label", "stub"]
    results = _run(base + ["--request-rate", "50,inf", "--max-concurrency", "2,8", "--num-warmups", "2"])
    assert len(results) == 4 and len(list(tmp_path.glob("stub-*.json"))) == 4
    r = results[0]
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (12, 0, 96)
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2el_ms", "request_throughput",
                "output_throughput", "request_goodput", "machine", "num_prompts", "dataset_name"):
        assert key in r
    rows = list(csv.DictReader(open(tmp_path / "stub-rate50-conc2.csv")))
    assert len(rows) == 12 and all(row["success"] == "True" for row in rows)
    assert "Serving Benchmark Result" in capsys.readouterr().out

    # A workload whose prompts ask the stub to fail, drop the stream, or stall past the timeout.
    from benchmarks.backends.openai_http import OpenAIBackend
    from benchmarks.load import run_load
    from benchmarks.metrics import summarize
    specs = [RequestSpec("fine", 1, 8), RequestSpec("STUB_HTTP_500", 1, 8), RequestSpec("STUB_DROP", 1, 8),
             RequestSpec("STUB_SLOW", 1, 8)]
    records, duration, _ = run_load(OpenAIBackend(stub, "stub", timeout_s=2), specs, [0.0] * 4, progress=False)
    assert [x.success for x in records] == [True, False, False, False]
    assert "HTTP 500" in records[1].error
    assert "ClientPayloadError" in records[2].error or "before [DONE]" in records[2].error
    assert "timeout" in records[3].error
    m = summarize(records, duration)
    assert (m["completed"], m["failed"]) == (1, 3)
    table = terminal_table({**m, "errors": [x.error for x in records], "backend": "openai"})
    assert "3 failed requests" in table and "HTTP 500" in table


def test_workload_file_is_served_as_saved(stub, tmp_path, smollm):
    specs = build_workload(smollm.tokenizer, "random", 5, seed=1, input_len=16, output_len=6, range_ratio=0.5)
    path = tmp_path / "workload.json"
    save_workload(path, specs)
    assert load_workload(path, 5) == specs
    base = ["--backend", "openai", "--base-url", stub, "--workload-file", str(path), "--result-dir", str(tmp_path),
            "--no-progress"]
    (r,) = _run(base + ["--num-prompts", "4"])
    assert r["completed"] == 4
    with pytest.raises(UserError, match="fewer than --num-prompts 6"):
        _run(base + ["--num-prompts", "6"])


def test_report_and_plots_from_result_files(stub, tmp_path):
    base = ["--backend", "openai", "--base-url", stub, "--num-prompts", "6", "--random-input-len", "16",
            "--random-output-len", "4", "--result-dir", str(tmp_path), "--no-progress"]
    _run(base + ["--request-rate", "20,40,inf"])
    _run(base + ["--max-concurrency", "1,2", "--label", "conc"])
    results = load_results(sorted(tmp_path.glob("*.json")))
    text = markdown_report(results)
    assert text.count("\n| openai |") == 3 and text.count("\n| conc |") == 2
    names = {p.name for p in plot_all(results, tmp_path / "plots")}
    assert names == {"latency_cdf.png", "latency_vs_rate.png", "throughput_vs_concurrency.png", "throughput.png"}
    assert all((tmp_path / "plots" / n).stat().st_size > 10_000 for n in names)


def test_harness_capacity_against_stub(stub):
    point = measure(stub, 100.0, 200, tokens=8)
    assert point["completed"] == 200 and point["failed"] == 0
    assert point["achieved_request_rate"] > 0 and point["p99_send_lag_ms"] >= point["median_send_lag_ms"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_atomic(path, '{"ok": 1}')


    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # fails inside the write, after the temp file exists
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "0"], "request rates must be positive"),
    (["--max-concurrency", "x"], "expected concurrencies"),
    (["--backend", "hf", "--request-rate", "2"], "runs offline"),
    (["--base-url", "http://127.0.0.1:9"], "cannot reach a server"),
    (["--goodput", "ttft=3"], "METRIC:MILLISECONDS"),
    (["--model", "no-such-model"], "unknown model"),
])
def test_bad_arguments_give_one_clear_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--num-prompts", "2", *argv],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-500:]


def test_in_process_backends_agree_token_for_token(smollm, tmp_path):
    """hf (transformers) and ours (core.generate) are both greedy: same prompts, same tokens."""
    from benchmarks.backends.hf import HFBackend
    from benchmarks.backends.ours import OursBackend
    specs = build_workload(smollm.tokenizer, "random", 3, input_len=12, output_len=5)
    hf = HFBackend("smollm2-135m", max_batch_size=2).run_batch(specs)
    ours = OursBackend("smollm2-135m", dtype="float32", max_batch_size=2).run_batch(specs)
    assert all(r.success and r.output_len == 5 for r in hf + ours)
    assert [r.generated_text for r in hf] == [r.generated_text for r in ours]
    # static batching: the second batch waits for the first, so its first token comes later
    assert hf[2].ttft_s > hf[1].e2el_s
    assert all(len(r.itl_s) == 4 and r.ttft_s > 0 for r in hf + ours)
