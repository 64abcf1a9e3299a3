import json
import math
import subprocess
import sys

import pytest

from benchmarks.backends.base import RequestRecord, RequestSpec
from core.generate import SamplingParams, generate
from optimization.case_study import make_workload, markdown_table, table_rows
from optimization.online import serve_continuous, serve_static
from optimization.steps import _ours_static_runner
from optimization.tune import attainment, parse_settings


def _record(ttft_s: float, tpot_s: float, n: int = 5, success: bool = True) -> RequestRecord:
    times = [ttft_s + i * tpot_s for i in range(n)]
    rec = RequestRecord.from_token_times(RequestSpec("x", 4, n), 0.0, times)
    rec.success = success
    return rec


def test_attainment_counts_requests_meeting_every_slo():
    records = [_record(0.05, 0.02), _record(0.20, 0.02), _record(0.05, 0.08), _record(0.01, 0.01, success=False)]
    assert attainment(records, {"ttft": 100, "tpot": 50}) == 0.25
    assert attainment(records, {"ttft": 300}) == 0.75


def test_bad_settings_are_one_clear_error():
    assert parse_settings("8:512,32:2048") == [(8, 512), (32, 2048)]
    for bad in ("8", "8:x", "0:512", ""):
        with pytest.raises(Exception, match="--settings"):
            parse_settings(bad)


def _summary(qps: float, p99: float, cost: float) -> dict:
    return {"request_throughput": qps, "output_throughput": qps * 10, "p50_e2el_ms": p99 / 2, "p99_e2el_ms": p99,
            "median_ttft_ms": 1.0, "median_tpot_ms": 1.0, "cost_per_million_output_tokens": cost}


def test_table_factors_are_relative_to_the_baseline():
    sat = 2.0
    steps = {name: {"runs": [{"request_rate": math.inf, "summary": _summary(qps, 0, cost)},
                             {"request_rate": sat, "summary": _summary(qps, p99, cost)}],
                    "weights_mb": w, "peak_rss_mb": 100.0, "gpu_peak_mb": float("nan"), "perplexity": None}
             for name, qps, p99, cost, w in [("baseline", 2.0, 1000.0, 20.0, 400.0),
                                             ("tuned-batching", 48.0, 100.0, 1.0, 100.0)]}
    for res in steps.values():
        res["runs"][0]["texts"] = ["a"]
    rows = table_rows({"steps": steps, "saturation_rate": sat})
    final = rows[1]
    assert final["qps_x"] == 24.0 and final["p99_x"] == 10.0 and final["cost_x"] == 20.0 and final["weights_x"] == 4
    assert "24.0x" in markdown_table(rows, sat)


def test_static_and_continuous_serving_give_the_same_greedy_tokens(tiny):
    specs = make_workload("tiny", 5, 6, 64, seed=0, random_weights=True)
    assert all(len(s.prompt_ids) == s.prompt_len for s in specs)
    arrivals = [0.0, 0.0, 0.01, 0.02, 0.05]
    static, _ = serve_static(_ours_static_runner(tiny), specs, arrivals, max_batch_size=2)
    from engines.ours import LLM

    engine = LLM(tiny, max_num_seqs=3, max_num_batched_tokens=64, max_model_len=128)
    stalls = {}
    continuous, duration = serve_continuous(engine, specs, arrivals, stalls)
    steps = stalls["slowest_turns"]  # slowest first
    assert 0 < len(steps) <= 8 and [s["ms"] for s in steps] == sorted((s["ms"] for s in steps), reverse=True)
    # counted after the step, so the turn that finishes the last request leaves none running
    assert all(0 <= s["step_ms"] <= s["ms"] and s["running"] >= 0 and "gc_ms" in s for s in steps)
    assert stalls["cuda_mallocs"] == stalls["alloc_retries"] == 0  # no CUDA here
    assert duration > 0 and all(r.success for r in static + continuous)
    assert [r.output_len for r in continuous] == [s.output_len for s in specs]
    assert [r.generated_text for r in continuous] == [r.generated_text for r in static]
    # each request's latency counts from its scheduled arrival, so queueing shows up in TTFT
    assert all(r.ttft_s >= 0 and r.e2el_s >= r.ttft_s for r in static + continuous)
    reference = generate(tiny.model, [specs[0].prompt_ids], SamplingParams(max_tokens=specs[0].output_len,
                                                                           ignore_eos=True))
    assert tiny.tokenizer.decode(reference.tokens[0], skip_special_tokens=True) == static[0].generated_text


def test_workload_file_round_trip(tmp_path):
    path = tmp_path / "workload.json"
    first = make_workload("smollm2-135m", 4, 16, 128, seed=1, workload_file=path)
    again = make_workload("smollm2-135m", 4, 16, 128, seed=1, workload_file=path)
    assert path.exists() and [(s.prompt, s.prompt_len, s.output_len) for s in first] == \
        [(s.prompt, s.prompt_len, s.output_len) for s in again]
    assert all(s.output_len <= 16 for s in first)


def test_book_preset_explains_itself_in_one_line():
    run = subprocess.run([sys.executable, "-m", "optimization", "--preset", "book"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error: --preset book") and "Traceback" not in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--int4-backend", "triton"], "error: --int4-backend triton"),
    (["--num-prompts", "4", "--latency-prompts", "5"], "error: --latency-prompts must be between 1 and"),
])
def test_bad_options_on_a_cpu_are_one_clear_error(args, message):
    run = subprocess.run([sys.executable, "-m", "optimization", "--device", "cpu", *args],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().startswith(message) and "Traceback" not in run.stderr


def test_case_study_pipeline_curves_and_shared_perplexity(tmp_path, monkeypatch):
    """The whole pipeline on the default model at toy sizes, each step in this process (run_isolated stubbed):
    the baseline and the final step trace curves around their own capacity, every step is also measured at the
    baseline's saturation rate (over the first latency_prompts requests; rate inf over all), and the steps that serve
    awq-int4's file report its perplexity, not a new one."""
    import optimization.case_study as cs
    from optimization.steps import StepConfig

    calls = []

    def in_process(fn, name, cfg):
        calls.append((name, cfg.rates, cfg.curve, cfg.ppl_tokens))
        return fn(name, cfg), 1.0

    monkeypatch.setattr(cs, "run_isolated", in_process)
    specs = make_workload("smollm2-135m", 3, 4, 48, seed=0)
    cfg = StepConfig("smollm2-135m", "cpu", None, False, specs, [math.inf], max_batch_size=2, quant="rtn",
                     ppl_tokens=128, tuning=[(2, 128), (4, 256)], latency_prompts=2)
    steps = ["baseline", "awq-int4", "tuned-batching", "kv-fp8"]
    report = cs.run_case_study(cfg, steps, tmp_path, [0.5, 2])
    sat = report["saturation_rate"]
    assert [c[0] for c in calls] == steps
    assert calls[1][1] == [math.inf, sat] and calls[1][2] == () and calls[2][3] == 0 < calls[1][3]
    assert calls[2][2] == () != calls[3][2]  # kv-fp8 is the final step here: it, not tuned-batching, has the curve
    assert "FP8 KV cache" in report["steps"]["kv-fp8"]["notes"]
    for name in ("baseline", "kv-fp8"):
        runs = report["steps"][name]["runs"]
        own = runs[0]["summary"]["request_throughput"]
        curve = [r["request_rate"] for r in runs if r["request_rate"] not in (math.inf, sat)]
        assert curve == [m * own for m in (0.5, 1.0, 2.0) if m * own != sat]
        assert [r["summary"]["completed"] for r in runs] == [3] + [2] * (len(runs) - 1)
    assert report["steps"]["kv-fp8"]["perplexity"] == report["steps"]["awq-int4"]["perplexity"] > 1
    table = cs.write_report(report, tmp_path)
    assert "(awq-int4's weights)" in table and (tmp_path / "latency_throughput.png").exists()
    # our engine's runs keep their slowest loop turns, and the report names the slowest of each
    text = (tmp_path / "report.md").read_text()
    assert all(r["stalls"]["slowest_turns"] for r in report["steps"]["tuned-batching"]["runs"])
    assert "Slowest turn" in text and "- tuned-batching @ inf:" in text and "- baseline @" not in text
    assert "Poisson arrivals, over the first 2 requests." in text


def test_a_run_cut_short_keeps_the_steps_it_finished(tmp_path, monkeypatch):
    """The report is written after every step: when a later step fails (or a time limit kills the run), the finished
    steps are on disk, and the report says which did not run."""
    import optimization.case_study as cs
    from optimization.steps import StepConfig

    def in_process(fn, name, cfg):
        if name == "awq-int4":
            raise RuntimeError("killed")
        return fn(name, cfg), 1.0

    monkeypatch.setattr(cs, "run_isolated", in_process)
    specs = make_workload("smollm2-135m", 2, 4, 48, seed=0)
    cfg = StepConfig("smollm2-135m", "cpu", None, False, specs, [math.inf], max_batch_size=2, quant="rtn")
    with pytest.raises(RuntimeError, match="killed"):
        cs.run_case_study(cfg, ["baseline", "awq-int4", "tuned-batching"], tmp_path, [1])
    saved = json.loads((tmp_path / "case_study.json").read_text())
    assert list(saved["steps"]) == ["baseline"] and saved["steps_pending"] == ["awq-int4", "tuned-batching"]
    assert saved["table"][0]["qps"] > 0
    assert "Partial report**: not run (yet): awq-int4, tuned-batching" in (tmp_path / "report.md").read_text()
