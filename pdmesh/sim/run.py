"""Runs of the simulator: one (policy, load) at a time, a list of loads, or DistServe's goodput
search, with a progress bar over the requests simulated.

Goodput as DistServe defines it: the highest request rate at which at least the target share
(90%) of requests meets both the TTFT and the TPOT SLO; a refused request is a miss. The search
doubles the load from a start until a run misses the target, then bisects between the last load
that met it and the first that did not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pdmesh.bench.metrics import RequestResult, RunMetrics, Slo, attainment, summarize
from pdmesh.config import PolicyName
from pdmesh.sim.mesh import MeshSpec, SimMesh
from pdmesh.sim.workload import SimRequest

Workload = Callable[[float], list[SimRequest]]  # a load value (a rate or a speed-up) -> its requests
Progress = Callable[[RequestResult], None]


@dataclass(frozen=True)
class Latency:
    """Decision latency of Placer.place, in microseconds: wall (preemption on a shared machine
    included) and the thread's CPU time (what the decision itself costs)."""

    count: int
    wall_p50_us: float
    wall_p99_us: float
    cpu_p50_us: float
    cpu_p99_us: float


@dataclass
class Run:
    policy: PolicyName
    load: float  # the load value: requests/s, or a trace speed-up
    rate: float  # the offered rate, requests/s
    metrics: RunMetrics
    ttft_attainment_pct: float
    tpot_attainment_pct: float
    rejected_pct: float  # refused at once (RESOURCE_EXHAUSTED, or OUT_OF_RANGE: never), counted as misses
    decisions: Latency
    wall_s: float  # how long the simulation took
    simulated_s: float  # virtual time the run spans
    results: list[RequestResult] = field(repr=False, default_factory=list)

    @property
    def attainment_pct(self) -> float:
        return self.metrics.goodput.attainment_pct if self.metrics.goodput is not None else 0.0


def simulate(
    spec: MeshSpec, policy: PolicyName, load: float, requests: list[SimRequest], slo: Slo,
    progress: Progress | None = None, concurrency: int = 0,
) -> Run:  # fmt: skip
    """One run; `concurrency` > 0: a closed loop of that many in flight (SimMesh.run)."""
    mesh = SimMesh(spec, policy, progress)
    started = time.perf_counter()
    results = mesh.run(requests, concurrency)
    wall = time.perf_counter() - started
    arrivals = [r.start_s for r in results]  # a closed loop's, as they happened
    span = max(arrivals, default=0.0) - min(arrivals, default=0.0)
    metrics = summarize(results, slo)
    met = attainment(results, slo)
    n = max(1, len(results))
    refused = sum(1 for r in results if r.code in ("RESOURCE_EXHAUSTED", "OUT_OF_RANGE"))
    return Run(
        policy, load, (len(requests) - 1) / span if span > 0 else math.inf, metrics, met.ttft_pct, met.tpot_pct,
        100.0 * refused / n, _latency(mesh.decision_ns, mesh.decision_cpu_ns), wall, mesh.loop.now(), results,
    )  # fmt: skip


def _latency(wall_ns: list[int], cpu_ns: list[int]) -> Latency:
    if not wall_ns:
        return Latency(0, 0.0, 0.0, 0.0, 0.0)
    w = np.percentile(np.asarray(wall_ns) / 1e3, [50, 99])
    c = np.percentile(np.asarray(cpu_ns) / 1e3, [50, 99])
    return Latency(len(wall_ns), float(w[0]), float(w[1]), float(c[0]), float(c[1]))


@dataclass(frozen=True)
class SearchSettings:
    start: float  # the first load tried
    target_pct: float = 90.0
    bisections: int = 5
    max_doublings: int = 12


def search_goodput(
    run: Callable[[float], Run], settings: SearchSettings, on_run: Callable[[Run], None] | None = None
) -> tuple[float | None, list[Run]]:
    """The highest load meeting the attainment target (None when even the start misses it after
    halving it `max_doublings` times), and every run made on the way."""
    runs: list[Run] = []

    def attempt(load: float) -> bool:
        r = run(load)
        runs.append(r)
        if on_run is not None:
            on_run(r)
        return r.attainment_pct >= settings.target_pct

    good, bad, load = None, None, settings.start
    for _ in range(settings.max_doublings):
        if attempt(load):
            good = load
            if bad is not None:
                break
            load *= 2
        else:
            bad = load
            if good is not None:
                break
            load /= 2
    if good is None or bad is None:
        return good, runs
    for _ in range(settings.bisections):
        mid = math.sqrt(good * bad)  # loads span octaves: bisect in the log
        if attempt(mid):
            good = mid
        else:
            bad = mid
    return good, runs
