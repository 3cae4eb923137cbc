"""The store's calls to the scheduler's Registry: registration, then a report every interval with
its status and the blocks each namespace stored and removed (a snapshot after each registration
and whenever the scheduler asks for one). Like a worker's reports, a lost one costs only
freshness: failures are logged and the next tick tries again."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import structlog

from pdmesh.channel import channel
from pdmesh.config import ChannelConfig, ServerConfig
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.kvstore import convert
from services.kvstore.store import BlockStore
from services.logging import Outage

log = structlog.get_logger(__name__)
_RETRY_S = 0.5
_OUTAGE_GRACE_S = 5.0  # a scheduler outage that lasts this long beyond a mesh's stop is news (Outage's)


def scheduler_grace_s(server: ServerConfig) -> float:
    """How long the scheduler may be away before the store warns. `pdmesh up` stops the store
    last, after the workers' drain (their last offers land): at every stop the scheduler is gone
    for as long as the workers take to stop, their stop timeout at most (pdmesh up gives every
    service the same drain grace, so the store's own stands for theirs)."""
    return server.stop_timeout_s + _OUTAGE_GRACE_S


class StoreReporter:
    def __init__(
        self, scheduler: str, info: worker_pb2.KVStoreInfo, store: BlockStore, config: ChannelConfig | None = None,
        grace_s: float = _OUTAGE_GRACE_S,
    ) -> None:  # fmt: skip
        self.info = info
        self.store = store
        self.grace_s = grace_s  # of a scheduler outage before a warning (scheduler_grace_s)
        self.draining = False  # this store is stopping: says so in its reports, and warns of no outage
        self._channel = channel(scheduler, config)
        self._stub = worker_pb2_grpc.RegistryStub(self._channel)
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self._interval: float | None = None  # None: not registered
        self._snapshot = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvstore-reporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close()

    async def _run(self) -> None:
        outage = Outage("scheduler", grace_s=self.grace_s, stopping=lambda: self.draining)
        while True:
            try:
                interval = await self._report()
                outage.answered()
                await asyncio.sleep(interval)
            except grpc.aio.AioRpcError as e:
                outage.failed(code=e.code().name, detail=e.details())
                self._interval = None  # register again; the report's changes are lost, so a snapshot follows
                await asyncio.sleep(_RETRY_S)

    async def _report(self) -> float:
        if self._interval is None:
            reply = await self._stub.RegisterKVStore(worker_pb2.RegisterKVStoreRequest(store=self.info), timeout=5)
            self._interval, self._snapshot = max(reply.report_interval_ms, 50) / 1000, True
            log.info("registered", store_id=self.info.store_id, scheduler_interval_ms=reply.report_interval_ms)
        self._seq += 1
        health = worker_pb2.WORKER_HEALTH_DRAINING if self.draining else worker_pb2.WORKER_HEALTH_SERVING
        report = worker_pb2.ReportKVStoreRequest(
            store_id=self.info.store_id, report_seq=self._seq, time_unix_ms=int(time.time() * 1000), health=health,
            status=convert.status_to_pb(self.store.status()),
            events=convert.events_to_pb(self.store.take_events(self._snapshot)),
        )  # fmt: skip
        reply = await self._stub.ReportKVStore(report, timeout=5)
        self._snapshot = reply.kv_snapshot_requested
        if reply.reregister:
            self._interval = None
            return 0.0
        return self._interval
