"""The scheduler's two gRPC faces, thin: Scheduler (clients) and Registry (workers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from engine.sampling_params import check_context
from engine.tokenizer import Tokenizer
from pdmesh.config import SchedulerConfig
from pdmesh.enums import WorkerRole
from pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.scheduler import convert
from services.scheduler.admission import Admission
from services.scheduler.convert_workers import (
    load_from_pb,
    store_info_from_pb,
    store_report_from_pb,
    worker_info_from_pb,
)
from services.scheduler.flow import FlowSettings, RequestFlow
from services.scheduler.policy import Policy
from services.scheduler.registry import Registry
from services.scheduler.request import Deadline, SchedulerRequest
from services.scheduler.streams import Streams
from services.scheduler.telemetry import RequestWatch, SchedulerMetrics
from services.status import ModelNotFound, NoCapacity


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig, tokenizer: Tokenizer, registry: Registry, policy: Policy) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.registry = registry
        self.policy = policy
        self.settings = FlowSettings(config.lease_ms, config.max_attempts, config.queue_timeout_ms / 1000)
        self.flows: set[RequestFlow] = set()
        self.metrics = SchedulerMetrics(config.model, self._num_running, self._num_waiting)
        self.releases: set[asyncio.Task[None]] = set()  # tickets being released for flows that ended
        self.streams = Streams()  # what a stop outlasting its grace ends with an ABORT chunk
        self.admission = Admission(self._decode_slots, config.max_queued_requests)

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        with RequestWatch(self.metrics, context.invocation_metadata()) as watch:
            if request.model and request.model != self.config.model:
                raise ModelNotFound(
                    "model", f"{request.model!r} is not served here", f"use {self.config.model!r} or leave it empty"
                )
            # Tokenizing is CPU work of any length: off the event loop, so no stream stalls on it.
            accepted = await asyncio.to_thread(
                convert.request_from_pb, request, self.tokenizer, self.config.max_prompt_bytes
            )
            watch.accepted(accepted)
            self._check_fits(accepted)
            deadline = Deadline.after(context.time_remaining())
            flow = RequestFlow(accepted, self.registry, self.policy, self.settings, deadline, self.releases)
            async with self.admission.admit(accepted.priority, self._queue_timeout_s(accepted)):
                self.flows.add(flow)
                try:
                    async for response in self.streams.run(flow):
                        watch.sent(response)
                        yield convert.response_to_pb(response)
                finally:
                    self.flows.discard(flow)

    async def ListModels(  # noqa: N802
        self, request: scheduler_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListModelsResponse:
        registry = self.registry
        info = convert.model_info_to_pb(
            self.config.model, registry.workers.values(), registry.max_model_len,
            len(registry.live(WorkerRole.PREFILL)), len(registry.live(WorkerRole.DECODE)),
        )  # fmt: skip
        return scheduler_pb2.ListModelsResponse(models=[info])

    async def GetClusterState(  # noqa: N802
        self, request: scheduler_pb2.GetClusterStateRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetClusterStateResponse:
        registry = self.registry
        workers = sorted(registry.workers.values(), key=lambda w: w.worker_id)
        stores = sorted(registry.stores.values(), key=lambda s: s.store_id)
        return scheduler_pb2.GetClusterStateResponse(
            time_unix_ms=int(time.time() * 1000), policy=self.policy.name.value,
            num_queued_requests=self._num_waiting(), num_running_requests=self._num_running(),
            workers=[convert.worker_state_to_pb(w, self.registry.health(w)) for w in workers],
            kv_stores=[convert.store_state_to_pb(s, registry) for s in stores],
        )  # fmt: skip

    def _num_waiting(self) -> int:
        """Requests queued for a decode slot, and admitted ones waiting for KV blocks."""
        return self.admission.queued + sum(f.waiting for f in self.flows)

    def _num_running(self) -> int:
        return len(self.flows) - sum(f.waiting for f in self.flows)

    def _decode_slots(self) -> int | None:
        """Batch slots of the live decode workers; None (no limit) when one states none or none
        is live (placement then answers at once)."""
        slots = [w.info.capacity.max_num_running_requests for w in self.registry.live(WorkerRole.DECODE)]
        return sum(slots) if slots and all(slots) else None

    def _queue_timeout_s(self, request: SchedulerRequest) -> float:
        timeout_s = self.settings.queue_timeout_s
        return min(timeout_s, request.slo.ttft_ms / 1000) if request.slo.ttft_ms > 0 else timeout_s

    def _check_fits(self, request: SchedulerRequest) -> None:
        """Refuse at once what no decode worker could ever hold, instead of queueing it forever."""
        if self.registry.max_model_len is not None:
            check_context(request.num_prompt_tokens, request.sampling.max_tokens, self.registry.max_model_len)
        num_tokens = request.num_prompt_tokens + request.sampling.max_tokens
        capacities = [w.info.kv_capacity_tokens for w in self.registry.live(WorkerRole.DECODE)]
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
        await self.registry.register(worker_info_from_pb(request.worker))
        return worker_pb2.RegisterWorkerResponse(
            report_interval_ms=self.report_interval_ms, kv_store_address=self._store_address()
        )

    async def ReportLoad(  # noqa: N802
        self, request: worker_pb2.ReportLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReportLoadResponse:
        known, snapshot_wanted = self.registry.report(load_from_pb(request))
        return worker_pb2.ReportLoadResponse(
            reregister=not known, kv_snapshot_requested=snapshot_wanted, kv_store_address=self._store_address()
        )

    async def RegisterKVStore(  # noqa: N802
        self, request: worker_pb2.RegisterKVStoreRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.RegisterKVStoreResponse:
        self.registry.register_store(store_info_from_pb(request.store))
        return worker_pb2.RegisterKVStoreResponse(report_interval_ms=self.report_interval_ms)

    async def ReportKVStore(  # noqa: N802
        self, request: worker_pb2.ReportKVStoreRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReportKVStoreResponse:
        known, snapshot_wanted = self.registry.report_store(store_report_from_pb(request))
        return worker_pb2.ReportKVStoreResponse(reregister=not known, kv_snapshot_requested=snapshot_wanted)

    def _store_address(self) -> str:
        store = self.registry.live_store()
        return store.info.address if store is not None else ""
