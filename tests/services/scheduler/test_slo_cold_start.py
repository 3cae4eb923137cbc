"""A fresh mesh without a profile admits what it can serve while its predictors learn: a forecast
refuses only on coefficients its pool's samples have exercised, and the outcomes of guesses do not
teach the margins.

Two H100s, 2026-11-26: 1 prefill + 1 decode worker (Llama-8B shapes, no profile), requests sending
TTFT 3,000 ms / TPOT 50 ms at 4 req/s: 64 of 90 refused, "TPOT 3807.4 ms" — the decode model
rested on the decode worker's first steps (its kernels compiling) while the prefill worker's prompt
steps had already made the pool count as calibrated; and plans whose forecasts met both targets
were refused by a TPOT margin learnt from forecasts made before the pool had any samples.

The reports below are GPU-like, in the order a fresh mesh sends them (engine.step_samples shapes):
prompt chunks of up to 2,048 tokens at ~12 ms + 0.03 ms a token, decode steps of 1 to 64 rows at
~10-15 ms.
"""

from __future__ import annotations

import random

import pytest
from slo_cluster import Cluster

from engine.step_samples import StepSample, StepShape
from pdmesh.enums import WorkerHealth
from services.scheduler.margin import Outcome
from services.scheduler.predictor import CALIBRATED_KIND_SAMPLES
from services.scheduler.reports import LoadReport
from services.status import SloOutOfReach, SloUnattainable

TTFT_MS, TPOT_MS = 3000.0, 50.0


def prompt_steps(prompt: int) -> list[StepSample]:
    """A prompt's chunks on a prefill worker: 12 ms + 0.03 ms a token + 2 ns an attention pair."""
    steps, done = [], 0
    while done < prompt:
        n = min(2048, prompt - done)
        shape = StepShape(n, StepShape.attention_pairs(n, done), 0, 0)
        steps.append(StepSample(shape, 12.0 + 0.03 * n + 2e-6 * shape.num_prefill_attention_pairs))
        done += n
    return steps


def decode_step(rows: int, context: int, ms: float | None = None) -> StepSample:
    """10 ms + 0.05 ms a row + 0.05 us a context token (batch 64 over 4k tokens each: ~26 ms)."""
    return StepSample(StepShape(0, 0, rows, context), 10.0 + 0.05 * rows + 5e-5 * context if ms is None else ms)


class Mesh:
    """The hand-built 1 prefill + 1 decode cluster, its workers reporting as a fresh mesh's do."""

    def __init__(self) -> None:
        self.cluster = Cluster(prefill=1, decode=1, profile=False)
        self.seq = 0
        self.rng = random.Random(0)

    def report(self, worker: str, samples: list[StepSample]) -> None:
        self.seq += 1
        report = LoadReport(worker, self.seq, health=WorkerHealth.SERVING, step_samples=tuple(samples))
        self.cluster.registry.report(report)

    def prompts(self, count: int) -> None:
        for _ in range(count):
            self.report("prefill-0", prompt_steps(self.rng.randrange(512, 8192)))

    def decodes(self, count: int, rows: tuple[int, int] = (1, 64)) -> None:
        samples = []
        for _ in range(count):
            n = self.rng.randint(*rows)
            samples.append(decode_step(n, sum(self.rng.randrange(512, 8192) for _ in range(n))))
        self.report("decode-0", samples)

    def place(self, prompt: int, max_tokens: int) -> str:
        placement = self.cluster.place(prompt, ttft_ms=TTFT_MS, tpot_ms=TPOT_MS, max_tokens=max_tokens)
        return placement.plan.value


def test_a_decode_model_resting_on_compiling_steps_refuses_nothing() -> None:
    mesh = Mesh()
    # The decode worker's first steps compile its kernels: 3.8 s each, at batch 1.
    mesh.report("decode-0", [decode_step(1, 4000 + i, ms=3800.0) for i in range(4)])
    mesh.prompts(40)  # the prefill worker's prompt steps: the pool has well over 64 samples
    decode = mesh.cluster.registry.workers["decode-0"].predictors
    assert decode.calibrated  # the pool as a whole: what refused every TPOT target before
    assert decode.step.decode_step_ms(2, 8000) > 1000  # the wild forecast of the GPU's refusals

    for _ in range(12):
        mesh.place(mesh.rng.randrange(512, 8192), mesh.rng.randrange(32, 512))  # none refused
    assert len(mesh.cluster.ledger.batch("decode-0")) == 12


def test_prompt_steps_do_not_calibrate_decode_forecasts() -> None:
    # The pool is every worker of one device kind and model: the prefill worker's prompt steps
    # count for prompt forecasts only; a decode step's forecast waits for decode steps.
    mesh = Mesh()
    mesh.prompts(40)
    mesh.decodes(CALIBRATED_KIND_SAMPLES - 1)
    decode = mesh.cluster.registry.workers["decode-0"].predictors
    prompt, step = StepShape(4096, StepShape.attention_pairs(4096, 0), 0, 0), StepShape(0, 0, 8, 8 * 4000)
    assert decode.calibrated_for(prompt)
    assert not decode.calibrated_for(step)
    mesh.decodes(1)
    assert decode.calibrated_for(step)


def test_outcomes_of_uncalibrated_forecasts_do_not_teach_the_margins() -> None:
    # The first requests are placed before any sample: their forecasts are ~0 ms guesses. Measured
    # at 15 ms a token, they would read as a 15x error and refuse every plan for the next 30 s.
    mesh = Mesh()
    cluster = mesh.cluster
    first = []
    for _ in range(10):
        shape = cluster.shape(2048, ttft_ms=TTFT_MS, tpot_ms=TPOT_MS, max_tokens=100)
        cluster.placer.place(shape)
        first.append(shape.request_id)
    cluster.now += 0.3
    for rid in first:
        cluster.placer.prefilled(rid)
    cluster.now += 1.5
    for rid in first:
        cluster.placer.ended(rid, 100)  # 15 ms a token
    assert cluster.ledger.margins.recent(Outcome.TPOT, "decode-0") == []
    assert cluster.ledger.margins.recent(Outcome.TTFT, "decode-0") == []

    mesh.prompts(40)
    mesh.decodes(64)
    for _ in range(8):
        mesh.place(mesh.rng.randrange(512, 8192), mesh.rng.randrange(32, 512))  # none refused


def test_a_fresh_mesh_admits_a_sustainable_stream_while_it_learns() -> None:
    # Requests arrive at 4 a second, the first before any report; each report (every 0.5 s) carries
    # the steps the workers ran since the last.
    mesh = Mesh()
    cluster = mesh.cluster
    live: list[tuple[str, float]] = []  # (request id, when it ends)
    for i in range(60):
        cluster.now += 0.25
        for rid, ends in [x for x in live if x[1] <= cluster.now]:
            cluster.placer.ended(rid, 100)
            live.remove((rid, ends))
        if i % 2 == 1:
            mesh.prompts(1)
            mesh.decodes(16, rows=(1, max(1, len(live))))
        shape = cluster.shape(mesh.rng.randrange(512, 8192), ttft_ms=TTFT_MS, tpot_ms=TPOT_MS, max_tokens=100)
        cluster.placer.place(shape)  # never refused
        cluster.placer.prefilled(shape.request_id)
        live.append((shape.request_id, cluster.now + 1.5))


def test_once_calibrated_a_plan_past_the_tpot_of_running_requests_is_refused_and_says_why() -> None:
    mesh = Mesh()
    mesh.prompts(40)
    mesh.decodes(64)
    mesh.decodes(64)
    mesh.cluster.running("decode-0", 30, tpot_ms=10.5, prompt=4000)  # ~12.7 ms a step: past 10.5 already

    with pytest.raises(SloUnattainable) as refused:
        mesh.place(1000, 100)

    assert "refused because the decode step after admission (its bound) exceeds a running request's TPOT" in str(
        refused.value
    )


@pytest.mark.parametrize(("ttft_ms", "tpot_ms", "field"), [(1.0, 0.0, "slo.ttft_ms"), (0.0, 0.01, "slo.tpot_ms")])
def test_a_target_under_the_margins_floor_is_out_of_reach_before_any_sample(
    ttft_ms: float, tpot_ms: float, field: str
) -> None:
    # A guess refuses nothing, but no bound is ever below the floor (margin.py): a 1 ms TTFT or a
    # 0.01 ms TPOT can never be met, and retrying cannot help, so even a fresh mesh says so.
    mesh = Mesh()
    with pytest.raises(SloOutOfReach) as refused:
        mesh.cluster.place(1000, ttft_ms=ttft_ms, tpot_ms=tpot_ms, max_tokens=16)
    assert refused.value.field == field
    assert "retrying will not help" in str(refused.value)
