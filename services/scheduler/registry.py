"""Which workers exist, what they last reported, and whether they may be placed on.

A worker registers when it starts and reports its load periodically; one whose reports stop for
`stale_after_ms`, or that a call found dead, is stale and takes no new requests until it reports
again. Re-registering under the same id replaces the old entry (a restarted worker).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from pdmesh.channel import channel
from pdmesh.v1 import decode_pb2_grpc, prefill_pb2_grpc, worker_pb2


class Role(enum.Enum):
    PREFILL = worker_pb2.WORKER_ROLE_PREFILL
    DECODE = worker_pb2.WORKER_ROLE_DECODE


@dataclass(eq=False)
class Worker:
    info: worker_pb2.WorkerInfo
    registered_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    load: worker_pb2.ReportLoadRequest = field(default_factory=worker_pb2.ReportLoadRequest)
    last_report_unix_ms: int = 0
    draining: bool = False
    dead: bool = False  # a call found it unreachable; cleared by its next report
    assigned: int = 0  # requests this scheduler has on it now
    _channel: grpc.aio.Channel | None = None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> Role:
        return Role(self.info.role)

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = channel(self.info.address)
        return self._channel

    def decode_stub(self) -> decode_pb2_grpc.DecodeStub:
        return decode_pb2_grpc.DecodeStub(self.channel)

    def prefill_stub(self) -> prefill_pb2_grpc.PrefillStub:
        return prefill_pb2_grpc.PrefillStub(self.channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class Registry:
    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.workers: dict[str, Worker] = {}

    async def register(self, info: worker_pb2.WorkerInfo) -> Worker:
        """A new or restarted worker. At the same address the old channel is kept: a worker
        re-registers after any lost report, and its streams in flight must not be cut."""
        old = self.workers.pop(info.worker_id, None)
        worker = Worker(info)
        if old is not None:
            if old.info.address == info.address:
                worker._channel, worker.assigned = old._channel, old.assigned
            else:
                await old.close()
        self.workers[info.worker_id] = worker
        return worker

    def report(self, load: worker_pb2.ReportLoadRequest) -> bool:
        """Record a load report; False when the worker is unknown (it must register again)."""
        worker = self.workers.get(load.worker_id)
        if worker is None:
            return False
        worker.load = load
        worker.last_seen = time.monotonic()
        worker.last_report_unix_ms = load.time_unix_ms
        worker.draining = load.health == worker_pb2.WORKER_HEALTH_DRAINING
        worker.dead = False
        return True

    def is_stale(self, worker: Worker) -> bool:
        return worker.dead or time.monotonic() - worker.last_seen > self.stale_after_s

    def health(self, worker: Worker) -> int:
        if self.is_stale(worker):
            return worker_pb2.WORKER_HEALTH_STALE
        return worker_pb2.WORKER_HEALTH_DRAINING if worker.draining else worker_pb2.WORKER_HEALTH_SERVING

    def live(self, role: Role, exclude: Iterable[Worker] = ()) -> list[Worker]:
        """Workers of `role` that may take a new request now."""
        skip = set(map(id, exclude))
        return [
            w for w in self.workers.values()
            if w.role is role and not w.draining and not self.is_stale(w) and id(w) not in skip
        ]  # fmt: skip

    def mark_dead(self, worker: Worker) -> None:
        worker.dead = True

    @property
    def max_model_len(self) -> int | None:
        lens = [w.info.capacity.max_model_len_tokens for w in self.workers.values() if not self.is_stale(w)]
        return min(lens) if lens else None

    async def close(self) -> None:
        for worker in self.workers.values():
            await worker.close()
