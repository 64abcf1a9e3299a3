"""When each request is sent: Poisson (burstiness 1) or gamma arrivals at a mean rate, seeded.

Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate for every burstiness; burstiness < 1 is
burstier than Poisson, > 1 more regular. As in vLLM's benchmark, the cumulative times are rescaled so the last
request leaves at exactly num/rate seconds, which keeps throughput comparable across seeds.
"""
from __future__ import annotations

import math

import numpy as np

from core.errors import UserError


def arrival_times(num: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send time of each request in seconds from the start, non-decreasing; all 0 for an infinite rate."""
    if request_rate <= 0:
        raise UserError("--request-rate must be positive (or inf)")
    if burstiness <= 0:
        raise UserError("--burstiness must be positive")
    if math.isinf(request_rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)
    times = np.cumsum(gaps)
    times *= (num / request_rate) / times[-1]
    return times.tolist()
