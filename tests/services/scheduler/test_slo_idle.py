""""Out of reach even on an idle worker" is judged at an idle worker's pace, not under today's load.

A live CPU run (BENCHMARKS.md, 2026-11-26, load average 13-14 on 2 cores) refused 16 requests
OUT_OF_RANGE, "retrying will not help", on a step model fitted while the workers shared their cores
with everything else: an idle worker would have served them. Here each worker's steps alternate
between the model's time (the core to itself) and three times it (sharing), so its fitted model is
1.2 times the idle one (the fit minimises relative error: (s - 1)^2 + (s - 3)^2 / 9 is least at
s = 1.2); what load makes late is refused with a retry hint, and only what an idle worker could not
meet is refused OUT_OF_RANGE.
"""

from __future__ import annotations

import re

import pytest

from engine.step_samples import StepSample, StepShape
from pdmesh.enums import WorkerHealth
from services.scheduler.reports import LoadReport
from services.status import SloOutOfReach, SloUnattainable
from tests.services.scheduler.slo_cluster import MODEL, Cluster

PROMPT = 20_000  # 10 steps of 2,048 tokens: 100 + 2,000 ms on an idle worker (slo_cluster's model)


def contended_steps(count: int) -> list[StepSample]:
    """Steps of 32 sizes, each size taken alone (the model's time) and shared (three times it)."""
    shapes = [StepShape(64 * (1 + i % 32), StepShape.attention_pairs(64 * (1 + i % 32), 0), i % 5, 100 * (i % 5))
              for i in range(count)]  # fmt: skip
    return [StepSample(s, MODEL.step_ms(s) * (1.0 if (i // 32) % 2 else 3.0)) for i, s in enumerate(shapes)]


def loaded_cluster() -> Cluster:
    cluster = Cluster(prefill=1, decode=1)
    steps = contended_steps(320)
    for worker in ("prefill-0", "decode-0"):
        for seq in range(5):
            samples = tuple(steps[64 * seq : 64 * (seq + 1)])
            cluster.registry.report(LoadReport(worker, seq + 1, health=WorkerHealth.SERVING, step_samples=samples))
    return cluster


def test_a_worker_slowed_by_load_is_fitted_slower_and_known_to_be_faster_idle() -> None:
    predictors = loaded_cluster().registry.workers["prefill-0"].predictors
    idle_ms = MODEL.prefill_ms(PROMPT, 0, 2048)
    assert idle_ms == pytest.approx(2100.0)
    assert predictors.step.prefill_ms(PROMPT, 0, 2048) == pytest.approx(1.2 * idle_ms, rel=0.01)  # under load
    assert predictors.idle_factor == pytest.approx(1 / 1.2, rel=0.01)  # the steps that had the core alone


def test_a_target_only_load_puts_out_of_reach_is_refused_with_a_retry_hint() -> None:
    cluster = loaded_cluster()
    with pytest.raises(SloUnattainable) as refused:  # loaded: ~2.52 s for the prompt; idle: ~2.1 s
        cluster.place(PROMPT, ttft_ms=2300)
    assert refused.value.retry_after_s == pytest.approx(2.3)  # after one target: the load may have passed


def test_a_target_no_idle_worker_could_meet_is_out_of_reach_naming_the_idle_forecast() -> None:
    cluster = loaded_cluster()
    with pytest.raises(SloOutOfReach) as refused:
        cluster.place(PROMPT, ttft_ms=1000)
    assert refused.value.field == "slo.ttft_ms" and refused.value.retry_after_s is None
    found = re.search(r"predicted to need (\d+) ms for the prompt alone \(20000 tokens\) even on an idle worker",
                      str(refused.value))  # fmt: skip
    assert found is not None, str(refused.value)
    assert int(found.group(1)) == pytest.approx(2105, rel=0.05)  # the idle prefill and the 5 ms push


def test_a_tpot_target_is_out_of_reach_only_below_an_idle_workers_lone_step() -> None:
    cluster = loaded_cluster()  # a lone decode step: ~12.1 ms fitted, ~10.1 ms idle
    with pytest.raises(SloUnattainable):
        cluster.place(100, tpot_ms=11.0)
    with pytest.raises(SloOutOfReach) as refused:
        cluster.place(100, tpot_ms=9.0)
    assert refused.value.field == "slo.tpot_ms"
