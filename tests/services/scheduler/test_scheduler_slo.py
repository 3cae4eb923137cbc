"""The scheduler under the `slo` policy, through the real gRPC door: its predictors calibrate from
the step samples workers report, and a saturated mesh refuses at once with RESOURCE_EXHAUSTED and
a RetryInfo saying when to come back, instead of queueing a request past its SLO."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import httpx
import pytest
from scheduler_mesh import Mesh, MeshFactory, eventually

from pdmesh.client import retry_after_s
from pdmesh.config import PolicyName, SloConfig
from pdmesh.v1 import worker_pb2
from services.scheduler.predictor import CALIBRATED_AFTER_SAMPLES

# The workers' engines, as their step samples say: a step takes 10 ms plus 5 ms per decode row.
STEPS = tuple(
    worker_pb2.StepSample(num_decode_requests=rows, num_decode_context_tokens=rows * ctx, duration_ms=10 + 5 * rows)
    for rows, ctx in ((1, 100), (2, 300), (4, 200), (8, 900), (16, 500))
) + tuple(
    worker_pb2.StepSample(num_prefill_tokens=n, num_prefill_attention_pairs=n * (n + 1) // 2, duration_ms=10.0)
    for n in (16, 64, 256)
)


PROMPT_STEPS = sum(1 for s in STEPS if s.num_prefill_tokens)  # the rarer kind in a report (3 of 8)


async def calibrated(mesh: Mesh, samples: int = CALIBRATED_AFTER_SAMPLES) -> None:
    """Until the scheduler has fitted every worker's step model to their samples, and their pool
    holds at least `samples` of each kind of step (prompt, decode): a refusal needs
    CALIBRATED_AFTER_SAMPLES of the kind it forecasts; before, forecasts refuse nothing."""
    for worker in mesh.workers:
        worker.step_samples = STEPS
    reports = math.ceil(samples / (PROMPT_STEPS * len(mesh.workers)))  # each worker's, for the pool's count
    deadline = time.monotonic() + 10
    while True:
        state = await mesh.cluster()
        models = [w.step_model for w in state.workers]
        if all(m.num_samples >= reports * len(STEPS) and abs(m.per_decode_request_ms - 5.0) < 0.01 for m in models):
            return
        assert time.monotonic() < deadline, f"the step models never calibrated: {models}"
        await asyncio.sleep(0.02)


async def test_a_saturated_mesh_refuses_at_once_with_resource_exhausted_and_retry_info(
    mesh_factory: MeshFactory,
) -> None:
    # Requests bring no SLO: the configured defaults apply (TPOT 30 ms, so four fit a batch: 10 + 5 x 4).
    mesh = await mesh_factory(
        prefill=1, decode=1, policy=PolicyName.SLO, slo=SloConfig(default_ttft_ms=5000, default_tpot_ms=30)
    )
    await calibrated(mesh)
    mesh.decode_servicer().token_delay_s = 0.05  # each stream lasts about a second
    streams = [mesh.client.generate(list(range(1, 21)), max_tokens=20, seed=i) for i in range(4)]
    firsts = [await anext(s) for s in streams]  # all four decoding at once
    assert {c.token_ids[0] > 0 for c in firsts} == {True}

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.client.complete(list(range(1, 21)), max_tokens=20, seed=9)

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # At once, not after queueing: the queue's refusal would say "waited N ms for a decode slot".
    assert "no plan meets the request's SLO now" in (refused.value.details() or "")
    assert "waited" not in (refused.value.details() or "")
    hint = retry_after_s(refused.value)
    assert hint is not None and 0.05 <= hint <= 20 * 0.030  # the first of the four leaves within 20 steps
    assert len(mesh.decode_servicer().generates) == 4  # the refused request cost no worker anything
    for s in streams:
        assert [c async for c in s][-1].finish_reason is not None  # the admitted ones finish

    # With the batch gone, the same request is admitted.
    done = await mesh.client.complete(list(range(1, 21)), max_tokens=20, seed=9)
    assert len(done.token_ids) == 20


async def test_an_slo_no_idle_worker_could_meet_is_out_of_range_without_a_retry_hint(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, policy=PolicyName.SLO)
    await calibrated(mesh, CALIBRATED_AFTER_SAMPLES)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.client.complete([1, 2, 3], max_tokens=4, ttft_ms=5)  # a prefill step alone takes 10 ms

    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert retry_after_s(refused.value) is None
    details = refused.value.details() or ""
    assert details.startswith("slo.ttft_ms: is 5 ms, and the fastest plan is predicted to need 10 ms")
    assert "retrying will not help" in details


async def test_over_http_an_slo_no_idle_worker_could_meet_is_a_400_naming_the_target(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, policy=PolicyName.SLO)
    await calibrated(mesh, CALIBRATED_AFTER_SAMPLES)

    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=30) as http:
        reply = await http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "slo": {"ttft_ms": 5}})

    assert reply.status_code == 400, reply.text
    assert "retry-after" not in reply.headers
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "slo.ttft_ms")
    assert error["code"] == "slo_out_of_reach"


async def test_a_request_that_could_not_get_a_decode_slot_within_its_ttft_is_refused_before_queueing(
    mesh_factory: MeshFactory,
) -> None:
    # Eight streams fill the scripted decode worker's eight slots for about 20 s (400 tokens, 50 ms
    # apart; the calibrated step with eight rows is 50 ms). A ninth with a 2 s TTFT target cannot
    # get a slot in time: refused at once with when to come back, not after 2 s in the queue.
    # (With 100 tokens, 5 s, a loaded machine reached the refusal with under 1 s of them left.)
    mesh = await mesh_factory(prefill=0, decode=1, policy=PolicyName.SLO)
    await calibrated(mesh, CALIBRATED_AFTER_SAMPLES)
    mesh.decode_servicer().token_delay_s = 0.05
    streams = [mesh.client.generate([1, 2, 3], max_tokens=400, seed=i) for i in range(8)]
    for s in streams:
        await anext(s)
    await eventually(lambda: mesh.decode_servicer().running == 8, what="every slot to be taken")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.client.complete([1, 2, 3], max_tokens=4, ttft_ms=2000)

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The policy's refusal, before the queue: the old queue held it its whole 2 s target first
    # and then said "waited 2000 ms for a decode slot" (a wall-clock bound here failed on a loaded
    # machine, so the test reads which refusal it was).
    assert refused.value.details().startswith("slo: no plan meets the request's SLO now")
    assert "waited" not in refused.value.details()
    hint = retry_after_s(refused.value)
    assert hint is not None and hint >= 1.0  # the first stream leaves seconds from now
    assert (await mesh.cluster()).num_queued_requests == 0
    for s in streams:
        await s.aclose()
