"""When an open-loop benchmark sends each request: seeded arrival processes.

Inter-arrival gaps are gamma-distributed with mean 1/rate and shape `burstiness` (vLLM's
parameterisation): burstiness 1 is a Poisson process (exponential gaps), below 1 burstier, above
1 more regular. An infinite rate sends everything at once.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from pdmesh.bench.workload import BenchRequest


def arrival_times(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Seconds from the start of the run at which each of `n` requests arrives; the first at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"--rate and --burstiness must be positive (got {rate} and {burstiness})")
    if math.isinf(rate) or n == 0:
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]


def with_arrivals(requests: list[BenchRequest], times: list[float]) -> list[BenchRequest]:
    return [replace(r, arrival_s=t) for r, t in zip(requests, times, strict=True)]


def time_scaled(requests: list[BenchRequest], speedup: float) -> list[BenchRequest]:
    """Arrival times divided by `speedup` (2 replays a trace twice as fast), the first moved to 0."""
    if speedup <= 0:
        raise ValueError(f"--trace-speedup must be positive (got {speedup})")
    start = min((r.arrival_s for r in requests if r.arrival_s is not None), default=0.0)
    return [replace(r, arrival_s=((r.arrival_s or 0.0) - start) / speedup) for r in requests]
