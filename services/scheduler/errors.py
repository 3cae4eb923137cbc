"""A worker's failed call, seen by the scheduler, and the typed error the client gets for it.

The client sees the status code the worker gave (a worker's INVALID_ARGUMENT stays
INVALID_ARGUMENT), with the worker named, never the scheduler's traceback.
"""

from __future__ import annotations

import grpc

from engine.errors import InvalidRequest
from services.scheduler.registry import Worker
from services.scheduler.retry import Phase
from services.status import DeadlineExceeded, LeaseExpired, NoCapacity, NoLiveWorker, ServiceError, TicketNotFound


class DownstreamFailed(Exception):
    """A call to a worker failed with `code` in `phase`; retry.classify says what to do."""

    def __init__(self, worker: Worker, code: grpc.StatusCode, details: str, phase: Phase) -> None:
        self.worker = worker
        self.code = code
        self.details = details
        self.phase = phase
        super().__init__(f"{worker.worker_id}: {code.name}: {details}")

    def client_error(self) -> Exception:
        """The typed error that ends the client's request with the worker's status."""
        code, details = self.code, f"{self.worker.worker_id} said: {self.details}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest("request", details, "fix the field it names")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return NoCapacity("kv_cache", details, "retry later, or send a shorter request")
        if code == grpc.StatusCode.NOT_FOUND:
            return TicketNotFound("ticket_id", details, "retry the request")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return LeaseExpired("ticket_id", details, "retry the request")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded("deadline", details, "give the request more time")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
            return NoLiveWorker("workers", details, "retry; the mesh moves requests off failed workers")
        return ServiceError("worker", details, "see the worker's log")

