"""What the simulator models of a CPU mesh on one host beyond the step model: cores its workers
share, the engine's time between steps, each request's calls before its prompt reaches a worker —
and how `pdmesh bench profile` measures the last two from its calibration requests."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pdmesh.bench.metrics import RequestResult, Slo
from pdmesh.bench.profile import Calibrated, with_overheads
from pdmesh.config import PolicyName, SloConfig
from pdmesh.sim.clock import EventLoop
from pdmesh.sim.cores import Cores, SharedCores
from pdmesh.sim.mesh import MeshSpec
from pdmesh.sim.run import simulate
from pdmesh.sim.workers import SimDecode
from pdmesh.sim.workload import SimRequest
from services.scheduler.predictor import StepModel, TransferModel
from services.scheduler.profile import Profile, RoleProfile

# A step: 10 ms + 0.1 ms per prompt token + 1 ms per decode row; a push: 2 ms; 1 byte of KV a token.
CPU = Profile(
    "cpu-test", "a test", "m", StepModel(fixed_ms=10.0, ms_per_prefill_token=0.1, ms_per_decode_request=1.0),
    RoleProfile(1 << 20), RoleProfile(1 << 20), TransferModel(fixed_ms=2.0), kv_bytes_per_token=1,
)  # fmt: skip


def finish_times(cores: Cores, loop: EventLoop, works: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start s, work ms) per step -> (end ms, wall ms the step was told), in start order."""
    ends: dict[int, tuple[float, float]] = {}
    for i, (start, work) in enumerate(works):
        done = lambda wall, i=i: ends.__setitem__(i, (round(loop.now() * 1000, 6), round(wall, 6)))  # noqa: E731
        loop.at(start, lambda w=work, d=done: cores.run(w, d))  # type: ignore[misc]
    loop.run()
    return [ends[i] for i in range(len(works))]


def test_steps_sharing_cores_slow_down_only_while_more_run_than_there_are_cores() -> None:
    loop = EventLoop()
    # Three steps on two cores: each at 2/3 pace until the 30 ms one is done (45 ms), then two on
    # two cores at full pace: the others' last 30 ms end at 75 ms.
    assert finish_times(SharedCores(loop, 2), loop, [(0.0, 30.0), (0.0, 60.0), (0.0, 60.0)]) == [
        (45.0, 45.0), (75.0, 75.0), (75.0, 75.0),
    ]  # fmt: skip
    loop = EventLoop()  # one core: at 50 ms a 20 ms step joins; both at half pace until it ends (90 ms)
    assert finish_times(SharedCores(loop, 1), loop, [(0.0, 100.0), (0.05, 20.0)]) == [(120.0, 120.0), (90.0, 40.0)]
    loop = EventLoop()  # a device each: nothing shared
    assert finish_times(Cores(loop), loop, [(0.0, 100.0), (0.05, 20.0)]) == [(100.0, 100.0), (70.0, 20.0)]


def lone_request(profile: Profile) -> RequestResult:
    """One 100-token prompt with 11 output tokens, alone on one decode worker (prefilled locally)."""
    spec = MeshSpec(profile, 0, 1, 16, SloConfig(default_ttft_ms=0, default_tpot_ms=0))
    run = simulate(spec, PolicyName.LEAST_LOADED, 1.0, [SimRequest(0, 0.0, 100, 11, (1, 2, 3, 4, 5, 6, 7))], Slo())
    return run.results[0]


def test_the_step_gap_and_the_request_overhead_lengthen_a_lone_request_by_exactly_themselves() -> None:
    plain = lone_request(CPU)
    assert plain.ttft_s == pytest.approx(0.020)  # 10 + 100 x 0.1 ms
    assert plain.tpot_s == pytest.approx(0.011)  # 10 + 1 ms a decode step

    slow = lone_request(dataclasses.replace(CPU, step_gap_ms=4.0, request_overhead_ms=30.0))
    assert slow.ttft_s == pytest.approx(0.020 + 0.004 + 0.030)  # the prefill step's gap, the calls before it
    assert slow.tpot_s == pytest.approx(0.015)


def test_a_hand_off_joins_the_decode_batch_the_profiles_hand_off_time_after_its_first_token() -> None:
    spec = MeshSpec(dataclasses.replace(CPU, handoff_ms=50.0), 1, 1, 16, SloConfig(default_ttft_ms=0))
    request = SimRequest(0, 0.0, 100, 11, (1, 2, 3, 4, 5, 6, 7))  # 100 tokens: past 32, handed off
    result = simulate(spec, PolicyName.LEAST_LOADED, 1.0, [request], Slo()).results[0]
    assert result.ttft_s == pytest.approx(0.022)  # its prefill (20 ms) and its push (2 ms)
    assert result.e2e_s - result.ttft_s == pytest.approx(0.050 + 10 * 0.011)  # the hand-off, then ten steps


def test_the_profile_takes_the_median_excess_of_its_calibration_requests_over_its_models() -> None:
    # Prompts of 100 tokens: predicted 20 ms of prefill + 2 ms of push; lone decodes over 100 + 16
    # tokens: a predicted 11 ms step.
    # Their second tokens: the hand-off (60, 70, 80 ms) after the 4 ms gap and an 11 ms decode step.
    prompts = [RequestResult(i, True, 100, 2, ttft_s=(22.0 + extra) / 1000, e2e_s=(22.0 + extra + 15 + h) / 1000)
               for i, (extra, h) in enumerate(((30, 60), (40, 70), (90, 80)))]  # fmt: skip
    decodes = [RequestResult(i, True, 100, 32, ttft_s=0.05, e2e_s=0.05 + 31 * tpot / 1000)
               for i, tpot in enumerate((14.0, 15.0, 30.0))]  # fmt: skip
    failed = RequestResult(9, False, 100, code="UNAVAILABLE")

    profile = with_overheads(CPU, Calibrated([*prompts, failed], [*decodes, failed]))

    assert profile.request_overhead_ms == pytest.approx(40.0)
    assert profile.step_gap_ms == pytest.approx(4.0)
    assert profile.handoff_ms == pytest.approx(70.0)
    faster = [RequestResult(0, True, 100, 2, ttft_s=0.010)]  # quicker than the model: no negative overhead
    assert with_overheads(CPU, Calibrated(faster, [])).request_overhead_ms == 0.0


@pytest.mark.parametrize("noise", [0.05, 0.5, 1.6])
def test_drawn_step_noise_keeps_the_models_mean_and_the_profiles_deviation(noise: float) -> None:
    # A busy CPU mesh reported 1.6: a normal clipped at a floor would have made the mean step a
    # third longer than the model's; the log-normal keeps it.
    loop, profile = EventLoop(), dataclasses.replace(CPU, step_noise=noise)
    worker = SimDecode(loop, "d", profile, CPU.decode, 16, 7, Cores(loop), on_first_token=lambda job: None,
                       on_finished=lambda job: None)  # fmt: skip
    draws = np.array([worker._noise() for _ in range(40_000)])
    assert draws.min() > 0
    assert draws.mean() == pytest.approx(1.0, abs=0.03 * max(1.0, noise))
    assert draws.std() == pytest.approx(noise, rel=0.15)
