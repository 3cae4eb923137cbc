"""The client library against a scripted scheduler on a real loopback server.

A user's arguments become the GenerateRequest the scheduler receives, the streamed responses
become Chunks with typed finish reasons, usage and placement, leaving the loop early cancels the
request, and the blocking Client behaves like the async one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from engine.sampling_params import SamplingParams
from pdmesh.client import (
    AsyncClient,
    ChatMessage,
    Client,
    Completion,
    ExecutionPlan,
    FinishReason,
    Priority,
    WorkerHealth,
    WorkerRole,
)
from pdmesh.config import ServerConfig
from pdmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2
from services.bootstrap import Server, ServicerBinding
from services.status import NoCapacity


class ScriptedScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers every Generate with "Hello" + " world" and records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[scheduler_pb2.GenerateRequest] = []
        self.cancelled = asyncio.Event()

    async def Generate(self, request: scheduler_pb2.GenerateRequest, context: Any) -> AsyncIterator[Any]:
        self.requests.append(request)
        if request.slo.ttft_ms == 1:
            raise NoCapacity("slo.ttft_ms", "no plan meets 1 ms", "relax the target")
        rid = request.request_id or "sched-1"
        try:
            yield scheduler_pb2.GenerateResponse(
                request_id=rid, chunk=common_pb2.TokenChunk(token_ids=[9906], text="Hello")
            )
            if request.request_id == "slow":
                await asyncio.sleep(10)
            yield scheduler_pb2.GenerateResponse(
                request_id=rid,
                chunk=common_pb2.TokenChunk(
                    token_ids=[1917, 2],
                    text=" world",
                    finish=common_pb2.Finish(reason=common_pb2.FINISH_REASON_STOP),
                ),
                usage=common_pb2.Usage(
                    prompt_tokens=5, completion_tokens=3, ttft_ms=12.5, decode_ms=8.0, e2e_ms=20.5
                ),
                placement=scheduler_pb2.Placement(
                    plan=scheduler_pb2.EXECUTION_PLAN_DISAGGREGATED,
                    prefill_worker_id="prefill-0",
                    decode_worker_id="decode-1",
                ),
            )
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def ListModels(self, request: Any, context: Any) -> scheduler_pb2.ListModelsResponse:
        model = scheduler_pb2.ModelInfo(name="smollm2", model_fingerprint="ab12", max_model_len_tokens=8192,
                                        num_prefill_workers=1, num_decode_workers=2)  # fmt: skip
        return scheduler_pb2.ListModelsResponse(models=[model])

    async def GetClusterState(self, request: Any, context: Any) -> scheduler_pb2.GetClusterStateResponse:
        decode = scheduler_pb2.WorkerState(
            info=worker_pb2.WorkerInfo(
                worker_id="decode-0", role=worker_pb2.WORKER_ROLE_DECODE, address="h:1", model="smollm2"
            ),
            health=worker_pb2.WORKER_HEALTH_SERVING,
            load=worker_pb2.ReportLoadRequest(
                num_kv_blocks_free=90, num_kv_blocks_total=100, num_kv_reservations=1
            ),
            last_report_unix_ms=1_700_000_000_000,
        )
        return scheduler_pb2.GetClusterStateResponse(policy="slo", workers=[decode])


@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[ScriptedScheduler, str]]:
    fake = ScriptedScheduler()
    binding = ServicerBinding(
        fake,
        scheduler_pb2_grpc.add_SchedulerServicer_to_server,
        scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"],
    )
    server = Server([binding], ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=1.0))
    await server.start()
    await server.set_serving()
    yield fake, f"127.0.0.1:{server.port}"
    await server.stop()


async def test_a_streamed_generation_arrives_as_typed_chunks(
    scheduler: tuple[ScriptedScheduler, str],
) -> None:
    fake, target = scheduler
    async with AsyncClient(target) as client:
        chunks = [
            c async for c in client.generate("Say hello", max_tokens=3, ttft_ms=500, priority=Priority.HIGH)
        ]
    assert [(c.token_ids, c.text, c.finish_reason) for c in chunks] == [
        ((9906,), "Hello", None),
        ((1917, 2), " world", FinishReason.STOP),
    ]
    assert chunks[0].usage is None and chunks[0].placement is None
    usage, placement = chunks[1].usage, chunks[1].placement
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.ttft_ms) == (5, 3, 12.5)
    assert usage.tpot_ms == 4.0
    assert placement is not None and placement.plan is ExecutionPlan.DISAGGREGATED
    assert (placement.prefill_worker_id, placement.decode_worker_id) == ("prefill-0", "decode-1")

    sent = fake.requests[0]
    assert sent.prompt.text == "Say hello"
    assert (sent.sampling.max_tokens, sent.sampling.temperature, sent.sampling.top_p) == (3, 0.0, 1.0)
    assert not sent.sampling.HasField("seed")
    assert (sent.slo.ttft_ms, sent.slo.tpot_ms, sent.priority) == (500.0, 0.0, common_pb2.PRIORITY_HIGH)


async def test_token_id_and_chat_prompts_and_a_sampling_object(
    scheduler: tuple[ScriptedScheduler, str],
) -> None:
    fake, target = scheduler
    async with AsyncClient(target) as client:
        done = await client.complete(
            [1, 2, 3], request_id="r-7", sampling=SamplingParams(seed=11, stop=("\n",)), top_k=5
        )
        await client.complete(
            [{"role": "system", "content": "Be brief."}, ChatMessage("user", "Hi")], model="smollm2"
        )
    assert done == Completion(
        "r-7", "Hello world", (9906, 1917, 2), FinishReason.STOP, done.usage, done.placement
    )
    by_ids, by_chat = fake.requests
    assert list(by_ids.prompt.token_ids.ids) == [1, 2, 3] and by_ids.request_id == "r-7"
    assert (by_ids.sampling.seed, list(by_ids.sampling.stop), by_ids.sampling.top_k) == (11, ["\n"], 5)
    assert [(m.role, m.content) for m in by_chat.prompt.chat.messages] == [
        (common_pb2.CHAT_ROLE_SYSTEM, "Be brief."),
        (common_pb2.CHAT_ROLE_USER, "Hi"),
    ]
    assert by_chat.model == "smollm2"


async def test_leaving_the_loop_early_cancels_the_request(scheduler: tuple[ScriptedScheduler, str]) -> None:
    fake, target = scheduler
    async with AsyncClient(target) as client:
        stream = client.generate("x", request_id="slow")
        async for chunk in stream:
            assert chunk.text == "Hello"
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(fake.cancelled.wait(), 5)


async def test_a_refusal_arrives_as_its_status_code(scheduler: tuple[ScriptedScheduler, str]) -> None:
    _, target = scheduler
    async with AsyncClient(target) as client:
        with pytest.raises(grpc.RpcError) as refused:
            await client.complete("x", ttft_ms=1)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert refused.value.details() == "slo.ttft_ms: no plan meets 1 ms; relax the target"  # type: ignore[attr-defined]


async def test_models_and_cluster_state(scheduler: tuple[ScriptedScheduler, str]) -> None:
    _, target = scheduler
    async with AsyncClient(target) as client:
        (model,) = await client.list_models()
        state = await client.cluster_state()
    assert (model.name, model.max_model_len_tokens, model.num_decode_workers) == ("smollm2", 8192, 2)
    worker = state.worker("decode-0")
    assert (worker.role, worker.health, worker.model) == (WorkerRole.DECODE, WorkerHealth.SERVING, "smollm2")
    assert (worker.num_kv_blocks_free, worker.num_kv_blocks_total, worker.num_kv_reservations) == (90, 100, 1)
    assert state.policy == "slo"


async def test_the_blocking_client_has_the_same_api(scheduler: tuple[ScriptedScheduler, str]) -> None:
    _, target = scheduler

    def use() -> tuple[Completion, str]:
        with Client(target) as client:
            return client.complete("Say hello", max_tokens=3), client.list_models()[0].name

    done, model = await asyncio.to_thread(use)
    assert (done.text, done.finish_reason, done.request_id, model) == (
        "Hello world",
        FinishReason.STOP,
        "sched-1",
        "smollm2",
    )
