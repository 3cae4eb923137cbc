"""A forecast from an uncalibrated model refuses nothing: without a profile, a pool's first few
step samples can fit a model that extrapolates wildly (two H200s, 2026-11-26: the first steps of a
prefill worker, Triton compiling beside them, gave a forecast of 1,884,338 ms for a 4,513-token
prompt, and the request was refused OUT_OF_RANGE, "retrying will not help"). Once the pool has
seen enough samples its forecasts count again, and an unreachable target is refused at once."""

from __future__ import annotations

import pytest

from engine.step_samples import StepSample, StepShape
from pdmesh.enums import WorkerHealth
from services.scheduler.predictor import CALIBRATED_AFTER_SAMPLES
from services.scheduler.reports import LoadReport
from services.status import SloOutOfReach
from tests.services.scheduler.slo_cluster import Cluster

PROMPT = 4513


def prefill_step(tokens: int, ms: float) -> StepSample:
    return StepSample(StepShape(tokens, StepShape.attention_pairs(tokens, 0), 0, 0), ms)


def report(cluster: Cluster, worker: str, seq: int, samples: list[StepSample]) -> None:
    cluster.registry.report(LoadReport(worker, seq, health=WorkerHealth.SERVING, step_samples=tuple(samples)))


def first_steps_compiling(cluster: Cluster) -> None:
    """Each worker's first steps: one long prompt chunk that took 60 s (its kernels compiling), and
    decode rows at 10 ms."""
    for seq, worker in enumerate(("prefill-0", "decode-0"), 1):
        samples = [prefill_step(2048, 60_000.0)] + [StepSample(StepShape(0, 0, 1, 100), 10.0)] * 4
        report(cluster, worker, seq, samples)


def test_a_wild_forecast_of_an_uncalibrated_pool_refuses_nothing() -> None:
    cluster = Cluster(prefill=1, decode=1, profile=False)
    first_steps_compiling(cluster)
    worker = cluster.registry.workers["prefill-0"]
    assert not worker.predictors.calibrated
    forecast = worker.predictors.step.prefill_ms(PROMPT, 0, 2048)
    assert forecast > 30_000  # the state that refused requests: far beyond any real prefill
    placement = cluster.place(PROMPT, ttft_ms=30_000)
    assert placement.decode.worker_id == "decode-0"


def test_once_calibrated_an_unreachable_target_is_refused_at_once() -> None:
    cluster = Cluster(prefill=1, decode=1, profile=False)
    first_steps_compiling(cluster)
    # Real steps: 10 ms plus 0.1 ms per prompt token, over the sizes a trace brings.
    sizes = [64 * (1 + i % 32) for i in range(CALIBRATED_AFTER_SAMPLES)]
    for seq, worker_id in enumerate(("prefill-0", "decode-0"), 3):
        report(cluster, worker_id, seq, [prefill_step(n, 10.0 + 0.1 * n) for n in sizes])
    worker = cluster.registry.workers["prefill-0"]
    assert worker.predictors.calibrated
    assert worker.predictors.step.prefill_ms(PROMPT, 0, 2048) < 2_000  # the compiling step no longer decides
    with pytest.raises(SloOutOfReach) as refused:
        cluster.place(PROMPT, ttft_ms=100)
    assert refused.value.field == "slo.ttft_ms"
    placement = cluster.place(PROMPT, ttft_ms=30_000)
    assert placement.decode.worker_id == "decode-0"
