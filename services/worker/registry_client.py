"""A worker's calls to the scheduler's Registry: registration and the periodic load report.

A worker registers once it serves, then reports its load every interval the scheduler asked for.
A report the scheduler does not recognise (it restarted) makes the worker register again. A lost
report costs only freshness, so failures are logged and retried on the next tick, never fatal.
The first report after each registration, and any the scheduler asks for, carries a snapshot of
the prefix cache's hashes instead of its changes. report_now() sends one at once (draining).
Each answer names the KV store and the KV listeners this worker may push to (kv_peers), which its
transport connects to ahead of any ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog

from pdmesh.channel import channel
from pdmesh.config import ChannelConfig
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.logging import Outage

log = structlog.get_logger(__name__)

# The worker's load now; True asks for a snapshot of its cached block hashes rather than changes.
LoadFn = Callable[[bool], Awaitable[worker_pb2.ReportLoadRequest]]


class Reporter:
    def __init__(
        self, scheduler: str, info: worker_pb2.WorkerInfo, load: LoadFn, config: ChannelConfig | None = None,
        on_store: Callable[[str], None] | None = None, on_peers: Callable[[list[str]], None] | None = None,
    ) -> None:  # fmt: skip
        """on_store hears the KV store the scheduler names in each answer ("" for none), on_peers
        the KV listeners it names for this worker to push to."""
        self.info = info
        self.load = load
        self.on_store = on_store
        self.on_peers = on_peers
        self._channel = channel(scheduler, config)
        self._stub = worker_pb2_grpc.RegistryStub(self._channel)
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self._registered = False
        self.has_registered = False  # once: the scheduler knows this worker (its health turns SERVING)
        self._interval = 0.5
        self._snapshot = True
        self._lock = asyncio.Lock()  # one report at a time: their sequence numbers must arrive in order
        self.draining = False

    @property
    def interval(self) -> float:
        """Seconds between reports, as the scheduler asked (every worker reports this often)."""
        return self._interval

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load-reporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close()

    async def report_now(self) -> None:
        """One report at once, out of turn (the worker started draining); failures are logged."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._report()

    async def _run(self) -> None:
        interval = 0.5
        outage = Outage("scheduler", stopping=lambda: self.draining)
        while True:
            try:
                interval = await self._report()
            except grpc.aio.AioRpcError as e:
                outage.failed(code=e.code().name, detail=e.details())
                await asyncio.sleep(0.5)
                continue
            outage.answered()
            await asyncio.sleep(interval)

    async def _report(self) -> float:
        """Register if needed, then send one report; returns the interval to the next."""
        async with self._lock:
            try:
                return await self._send()
            except grpc.aio.AioRpcError:
                self._registered = False  # and so the next report is a snapshot: this one's changes are lost
                raise

    async def _send(self) -> float:
        if not self._registered:
            self._interval = await self._register()
        report = await self.load(self._snapshot)
        self._seq += 1
        report.worker_id = self.info.worker_id
        report.report_seq = self._seq
        report.time_unix_ms = int(time.time() * 1000)
        report.health = worker_pb2.WORKER_HEALTH_DRAINING if self.draining else worker_pb2.WORKER_HEALTH_SERVING
        reply = await self._stub.ReportLoad(report, timeout=5)
        self._snapshot = reply.kv_snapshot_requested
        if self.on_store is not None:
            self.on_store(reply.kv_store_address)
        if self.on_peers is not None and not reply.reregister:
            self.on_peers(list(reply.kv_peers))
        if reply.reregister:
            self._registered = False
            return 0.0
        return self._interval

    async def _register(self) -> float:
        resp = await self._stub.RegisterWorker(worker_pb2.RegisterWorkerRequest(worker=self.info), timeout=5)
        log.info("registered", scheduler_interval_ms=resp.report_interval_ms, worker_id=self.info.worker_id)
        self._registered, self._snapshot, self.has_registered = True, True, True
        return max(resp.report_interval_ms, 50) / 1000
