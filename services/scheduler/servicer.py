"""The scheduler's two gRPC faces, thin: Scheduler (clients) and Registry (workers)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from engine.sampling_params import check_context
from engine.tokenizer import Tokenizer
from pdmesh.config import SchedulerConfig
from pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.scheduler.convert import parse_generate
from services.scheduler.handoff import RequestFlow
from services.scheduler.policy import Policy
from services.scheduler.registry import Registry, Role
from services.status import ModelNotFound, NoCapacity


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig, tokenizer: Tokenizer, registry: Registry, policy: Policy) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.registry = registry
        self.policy = policy
        self.running = 0

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        if request.model and request.model != self.config.model:
            raise ModelNotFound(
                "model", f"{request.model!r} is not served here", f"use {self.config.model!r} or leave it empty"
            )
        parsed = parse_generate(request, self.tokenizer)
        if self.registry.max_model_len is not None:
            check_context(len(parsed.prompt_token_ids), parsed.max_tokens, self.registry.max_model_len)
        check_fits(len(parsed.prompt_token_ids) + parsed.max_tokens, self.registry)
        flow = RequestFlow(
            parsed, self.registry, self.policy, self.config.lease_ms, self.config.max_attempts,
            context.time_remaining(), self.config.queue_timeout_ms / 1000,
        )  # fmt: skip
        self.running += 1
        try:
            async for response in flow.run():
                yield response
        finally:
            self.running -= 1

    async def ListModels(  # noqa: N802
        self, request: scheduler_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListModelsResponse:
        workers = list(self.registry.workers.values())
        info = scheduler_pb2.ModelInfo(
            name=self.config.model,
            model_fingerprint=workers[0].info.kv_layout.model_fingerprint if workers else "",
            max_model_len_tokens=self.registry.max_model_len or 0,
            num_prefill_workers=len(self.registry.live(Role.PREFILL)),
            num_decode_workers=len(self.registry.live(Role.DECODE)),
        )
        return scheduler_pb2.ListModelsResponse(models=[info])

    async def GetClusterState(  # noqa: N802
        self, request: scheduler_pb2.GetClusterStateRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetClusterStateResponse:
        states = [
            scheduler_pb2.WorkerState(
                info=w.info, health=self.registry.health(w), load=w.load,  # type: ignore[arg-type]
                last_report_unix_ms=w.last_report_unix_ms, num_assigned_requests=w.assigned,
            )
            for w in sorted(self.registry.workers.values(), key=lambda w: w.worker_id)
        ]  # fmt: skip
        return scheduler_pb2.GetClusterStateResponse(
            time_unix_ms=int(time.time() * 1000), policy=self.policy.name,
            num_running_requests=self.running, workers=states,
        )  # fmt: skip


def check_fits(num_tokens: int, registry: Registry) -> None:
    """Refuse at once a request no decode worker could ever hold, instead of queueing it forever."""
    capacities = [
        w.info.capacity.num_kv_blocks_total * w.info.kv_layout.block_size_tokens
        for w in registry.live(Role.DECODE)
    ]
    if capacities and num_tokens > max(capacities):
        raise NoCapacity(
            "prompt",
            f"the request needs KV for {num_tokens} tokens and the largest decode worker holds {max(capacities)}",
            "shorten the prompt or max_tokens, or add decode memory",
        )


class RegistryServicer(worker_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry, report_interval_ms: int) -> None:
        self.registry = registry
        self.report_interval_ms = report_interval_ms

    async def RegisterWorker(  # noqa: N802
        self, request: worker_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.RegisterWorkerResponse:
        await self.registry.register(request.worker)
        return worker_pb2.RegisterWorkerResponse(report_interval_ms=self.report_interval_ms)

    async def ReportLoad(  # noqa: N802
        self, request: worker_pb2.ReportLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReportLoadResponse:
        return worker_pb2.ReportLoadResponse(reregister=not self.registry.report(request))
