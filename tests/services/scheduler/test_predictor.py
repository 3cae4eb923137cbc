"""The predictors calibrate from what workers report: step samples and KV pushes in load reports,
through the registry, as the scheduler receives them."""

from __future__ import annotations

import random

import pytest

from engine.kv_layout import KVLayout
from engine.step_samples import StepSample, StepShape
from pdmesh.enums import WorkerHealth, WorkerRole
from services.scheduler.predictor import Calibration, CalibrationSettings, StepModel, TransferModel
from services.scheduler.registry import Registry, Worker
from services.scheduler.reports import Capacity, LoadReport, WorkerInfo

# A device: 8 ms a step, 0.05 ms a prompt token, 2 ns a prompt attention pair, 0.05 ms a decode
# row, 0.05 us a context token (an H100 on an 8B model, roughly).
TRUE = StepModel(8.0, 0.05, 2.0, 0.05, 0.05)
LAYOUT = KVLayout("fp", "bfloat16", 16, 32, 8, 128)


def registry(prior: StepModel | None = None) -> Registry:
    return Registry(60.0, None, Calibration(CalibrationSettings(), prior, TransferModel() if prior else None))


def add(reg: Registry, name: str, role: WorkerRole) -> Worker:
    return reg.add(WorkerInfo(name, role, f"test://{name}", "", "m", LAYOUT, Capacity(), "gpu"), None)


def prefill_steps(rng: random.Random, n: int, model: StepModel = TRUE) -> list[StepSample]:
    """Prompt chunks of up to 8k tokens after up to 30k cached ones, timed with 5% noise."""
    out = []
    for _ in range(n):
        tokens, prefix = rng.randint(64, 8192), rng.randint(0, 30_000)
        shape = StepShape(tokens, StepShape.attention_pairs(tokens, prefix))
        out.append(StepSample(shape, model.step_ms(shape) * rng.gauss(1.0, 0.05)))
    return out


def decode_steps(rng: random.Random, n: int, model: StepModel = TRUE) -> list[StepSample]:
    out = []
    for _ in range(n):
        batch = rng.randint(1, 128)
        shape = StepShape(0, 0, batch, batch * rng.randint(500, 30_000))
        out.append(StepSample(shape, model.step_ms(shape) * rng.gauss(1.0, 0.05)))
    return out


def report(
    reg: Registry, worker: Worker, seq: int, steps: list[StepSample], pushes: tuple[tuple[int, float], ...] = ()
) -> None:
    """One load report, as the Registry servicer hands it over."""
    load = LoadReport(worker.worker_id, seq, health=WorkerHealth.SERVING, step_samples=tuple(steps),
                      transfer_samples=pushes)  # fmt: skip
    assert reg.report(load) == (True, False)


def test_reports_of_a_mixed_worker_calibrate_every_coefficient_from_nothing() -> None:
    rng = random.Random(1)
    reg = registry()
    worker = add(reg, "decode-0", WorkerRole.DECODE)
    for seq in range(1, 11):  # ten reports of 64 steps each, prompt chunks and decode rows mixed
        report(reg, worker, seq, prefill_steps(rng, 16) + decode_steps(rng, 48))

    fitted = worker.predictors.step
    for name in ("fixed_ms", "ms_per_prefill_token", "ns_per_attention_pair", "us_per_decode_context_token"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.15), name
    assert worker.predictors.num_step_samples == 640
    # What placement asks: a 15k-token prompt, a 32 x 15k decode step. Within 5%.
    assert fitted.prefill_ms(15_000, 0, 8192) == pytest.approx(TRUE.prefill_ms(15_000, 0, 8192), rel=0.05)
    assert fitted.decode_step_ms(32, 32 * 15_000) == pytest.approx(TRUE.decode_step_ms(32, 32 * 15_000), rel=0.05)


def test_a_decode_worker_that_never_prefilled_predicts_prompts_from_its_peers() -> None:
    rng = random.Random(2)
    reg = registry()
    prefill, decode = add(reg, "prefill-0", WorkerRole.PREFILL), add(reg, "decode-0", WorkerRole.DECODE)
    for seq in range(1, 9):
        report(reg, prefill, seq, prefill_steps(rng, 64))
        report(reg, decode, seq, decode_steps(rng, 64))

    assert decode.predictors.step.prefill_ms(8000, 0, 8192) == pytest.approx(TRUE.prefill_ms(8000, 0, 8192), rel=0.05)
    assert prefill.predictors.step.decode_step_ms(64, 64 * 8000) == pytest.approx(
        TRUE.decode_step_ms(64, 64 * 8000), rel=0.05
    )


def test_a_worker_that_slows_down_is_predicted_slow_within_a_few_reports() -> None:
    rng = random.Random(3)
    reg = registry(prior=TRUE)
    worker = add(reg, "prefill-0", WorkerRole.PREFILL)
    for seq in range(1, 6):
        report(reg, worker, seq, prefill_steps(rng, 64))
    assert worker.predictors.step.prefill_ms(8000, 0, 8192) == pytest.approx(TRUE.prefill_ms(8000, 0, 8192), rel=0.05)

    slow = StepModel(*(2 * c for c in (8.0, 0.05, 2.0, 0.05, 0.05)))  # thermal throttling, a noisy neighbour
    for seq in range(6, 30):  # 24 reports: about three forgetting windows
        report(reg, worker, seq, prefill_steps(rng, 64, slow))

    assert worker.predictors.step.prefill_ms(8000, 0, 8192) == pytest.approx(slow.prefill_ms(8000, 0, 8192), rel=0.1)


def test_the_profile_is_the_prior_until_samples_say_otherwise() -> None:
    reg = registry(prior=TRUE)
    worker = add(reg, "prefill-0", WorkerRole.PREFILL)

    assert worker.predictors.step.prefill_ms(4000, 1000, 2048) == pytest.approx(TRUE.prefill_ms(4000, 1000, 2048))
    assert worker.predictors.num_step_samples == 0


def test_kv_pushes_calibrate_the_transfer_predictor() -> None:
    rng = random.Random(4)
    reg = registry()
    worker = add(reg, "prefill-0", WorkerRole.PREFILL)
    mib = 1 << 20
    sizes = [rng.randint(1, 2048) for _ in range(64)]
    pushes = tuple((n * mib, (3.0 + 0.02 * n) * rng.gauss(1.0, 0.03)) for n in sizes)

    report(reg, worker, 1, [], pushes)

    model = worker.predictors.transfer
    assert model.fixed_ms == pytest.approx(3.0, rel=0.1)
    assert model.ms_per_mib == pytest.approx(0.02, rel=0.1)


def test_a_worker_registering_again_at_the_same_address_keeps_its_calibration() -> None:
    rng = random.Random(5)
    reg = registry()
    worker = add(reg, "prefill-0", WorkerRole.PREFILL)
    report(reg, worker, 1, prefill_steps(rng, 64))

    again = add(reg, "prefill-0", WorkerRole.PREFILL)  # it restarted, or lost a report

    assert again is not worker and again.predictors is worker.predictors
