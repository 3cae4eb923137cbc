"""Registration with the scheduler and the periodic load report.

A worker registers once it serves, then reports its load every interval the scheduler asked for.
A report the scheduler does not recognise (it restarted) makes the worker register again. A lost
report costs only freshness, so failures are logged and retried on the next tick, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog

from pdmesh.channel import channel
from pdmesh.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger(__name__)

LoadFn = Callable[[], Awaitable[worker_pb2.ReportLoadRequest]]


class Reporter:
    def __init__(self, scheduler: str, info: worker_pb2.WorkerInfo, load: LoadFn) -> None:
        self.info = info
        self.load = load
        self._channel = channel(scheduler)
        self._stub = worker_pb2_grpc.RegistryStub(self._channel)
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self.draining = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load-reporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close()

    async def _register(self) -> float:
        resp = await self._stub.RegisterWorker(worker_pb2.RegisterWorkerRequest(worker=self.info), timeout=5)
        log.info("registered", scheduler_interval_ms=resp.report_interval_ms, worker_id=self.info.worker_id)
        return max(resp.report_interval_ms, 50) / 1000

    async def _run(self) -> None:
        interval: float | None = None
        while True:
            try:
                if interval is None:
                    interval = await self._register()
                report = await self.load()
                self._seq += 1
                report.worker_id = self.info.worker_id
                report.report_seq = self._seq
                report.time_unix_ms = int(time.time() * 1000)
                report.health = worker_pb2.WORKER_HEALTH_DRAINING if self.draining else worker_pb2.WORKER_HEALTH_SERVING
                resp = await self._stub.ReportLoad(report, timeout=5)
                if resp.reregister:
                    interval = None
                    continue
            except grpc.aio.AioRpcError as e:
                log.warning("scheduler unreachable", code=e.code().name, detail=e.details())
                interval = None
                await asyncio.sleep(0.5)
                continue
            await asyncio.sleep(interval)
