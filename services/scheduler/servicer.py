"""The scheduler's two gRPC faces, thin: Scheduler (clients) and Registry (workers)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.scheduler import convert
from services.scheduler.convert_workers import (
    load_from_pb,
    store_info_from_pb,
    store_report_from_pb,
    worker_info_from_pb,
)
from services.scheduler.door import Door
from services.scheduler.policy import Policy
from services.scheduler.registry import Registry
from services.scheduler.request import Deadline


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """The gRPC door: converts, enters the core through the Door, converts back."""

    def __init__(self, door: Door, registry: Registry, policy: Policy) -> None:
        self.door = door
        self.registry = registry
        self.policy = policy

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        with self.door.watch(context.invocation_metadata()) as watch:
            accepted = await self.door.accept(convert.request_from_pb(request), watch)
            deadline = Deadline.after(context.time_remaining())
            async for response in self.door.generate(accepted, deadline, watch):
                yield convert.response_to_pb(response)

    async def ListModels(  # noqa: N802
        self, request: scheduler_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListModelsResponse:
        registry, ready = self.registry, self.door.readiness()
        info = convert.model_info_to_pb(
            self.door.model, registry.workers.values(), registry.max_model_len, ready.num_prefill, ready.num_decode
        )
        return scheduler_pb2.ListModelsResponse(models=[info])

    async def GetClusterState(  # noqa: N802
        self, request: scheduler_pb2.GetClusterStateRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.GetClusterStateResponse:
        registry = self.registry
        workers = sorted(registry.workers.values(), key=lambda w: w.worker_id)
        stores = sorted(registry.stores.values(), key=lambda s: s.store_id)
        return scheduler_pb2.GetClusterStateResponse(
            time_unix_ms=int(time.time() * 1000), policy=self.policy.name.value,
            num_queued_requests=self.door.num_queued, num_running_requests=self.door.num_running,
            workers=[convert.worker_state_to_pb(w, self.registry.health(w)) for w in workers],
            kv_stores=[convert.store_state_to_pb(s, registry) for s in stores],
        )  # fmt: skip


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
            reregister=not known, kv_snapshot_requested=snapshot_wanted, kv_store_address=self._store_address(),
            kv_peers=self.registry.kv_peers(request.worker_id),
        )  # fmt: skip

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
