"""Per-request records -> the aggregate numbers of a run, with vLLM's benchmark field names and definitions.

TTFT: send -> first token. TPOT: (e2el - ttft) / (output tokens - 1), per request, over requests with > 1 token.
ITL: every gap between consecutive streamed chunks, pooled over all requests. E2EL: send -> last token.
Each has mean_, median_, std_ and p{90,95,99}_ *_ms (numpy's linear-interpolation percentiles, as vLLM); a metric
with no samples is None (vLLM writes 0, which reads like a measurement).
Throughputs divide by the benchmark duration (first send -> last completion); failed requests count in
`failed` and nowhere else. Goodput counts completed requests meeting every SLO (ms): ttft, tpot, e2el.
"""
from __future__ import annotations

import numpy as np

from core.errors import UserError

from benchmarks.backends.base import RequestRecord

PERCENTILES = (90, 95, 99)
DEFAULT_GOODPUT = {"ttft": 100.0, "tpot": 50.0}  # the book's interactive SLOs: TTFT < 100 ms, inter-token < 50 ms


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """['ttft:100', 'tpot:50'] -> {'ttft': 100.0, 'tpot': 50.0} (milliseconds)."""
    if not pairs:
        return dict(DEFAULT_GOODPUT)
    slos = {}
    for pair in pairs:
        name, colon, value = pair.partition(":")
        if not colon:
            raise UserError(f"--goodput {pair!r}: expected METRIC:MILLISECONDS, e.g. ttft:100")
        if name not in ("ttft", "tpot", "e2el"):
            raise UserError(f"--goodput {pair!r}: the metric must be ttft, tpot or e2el")
        try:
            slos[name] = float(value)
        except ValueError:
            raise UserError(f"--goodput {pair!r}: expected METRIC:MILLISECONDS, e.g. ttft:100") from None
        if slos[name] <= 0:
            raise UserError(f"--goodput {pair!r}: the SLO must be positive")
    return slos


def _stats(name: str, values_s: list[float]) -> dict[str, float | None]:
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"] + [f"p{p}_{name}_ms" for p in PERCENTILES]
    if not values_s:  # not measured (no successful request, or a backend that does not time each token): null
        return dict.fromkeys(keys)
    v = np.asarray(values_s) * 1000.0
    out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(v.std())}
    out.update({f"p{p}_{name}_ms": float(np.percentile(v, p)) for p in PERCENTILES})
    return out


def summarize(records: list[RequestRecord], duration_s: float, goodput_ms: dict[str, float] | None = None,
              gpu_hour_price: float | None = None, num_gpus: int = 1) -> dict:
    """Aggregate metrics of one run. gpu_hour_price (per GPU-hour) adds cost_per_million_output_tokens."""
    if duration_s <= 0:
        raise ValueError("duration must be positive")
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    out = {"duration": duration_s, "completed": len(ok), "failed": len(records) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration_s,
           "input_throughput": total_in / duration_s,
           "output_throughput": total_out / duration_s,
           "total_token_throughput": (total_in + total_out) / duration_s}
    slos = goodput_ms or {}
    good = sum(all(getattr(r, f"{k}_s") * 1000.0 <= v for k, v in slos.items()) for r in ok)
    out["request_goodput"] = good / duration_s if slos else None
    out["goodput_slos_ms"] = slos
    out.update(_stats("ttft", [r.ttft_s for r in ok]))
    out.update(_stats("tpot", [r.tpot_s for r in ok if r.output_len > 1]))
    out.update(_stats("itl", [g for r in ok for g in r.itl_s]))
    out.update(_stats("e2el", [r.e2el_s for r in ok]))
    out["cost_per_million_output_tokens"] = (
        gpu_hour_price * num_gpus * duration_s / 3600.0 / total_out * 1e6 if gpu_hour_price and total_out else None)
    return out
