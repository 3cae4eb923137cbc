"""A worker's gRPC failure, seen by the scheduler, as a typed error the interceptor maps back.

The client sees the same status code the worker gave (a worker's INVALID_ARGUMENT stays
INVALID_ARGUMENT), with the worker named, never the scheduler's traceback.
"""

from __future__ import annotations

import grpc

from engine.errors import InvalidRequest
from services.scheduler.registry import Worker
from services.status import LeaseExpired, NoCapacity, NoLiveWorker, ServiceError, TicketNotFound


class DownstreamFailed(Exception):
    """A worker is unreachable or its KV transfer failed: the caller may try another worker."""

    def __init__(self, worker: Worker, code: grpc.StatusCode, details: str) -> None:
        self.worker = worker
        self.code = code
        super().__init__(f"{worker.worker_id}: {code.name}: {details}")


def from_rpc_error(error: grpc.aio.AioRpcError, worker: Worker) -> Exception:
    code, details = error.code(), f"{worker.worker_id} said: {error.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest("request", details, "fix the field it names")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return NoCapacity("kv_cache", details, "retry later, or send a shorter request")
    if code == grpc.StatusCode.NOT_FOUND:
        return TicketNotFound("ticket_id", details, "retry the request")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return LeaseExpired("ticket_id", details, "retry the request")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return error  # the client's own deadline ran out; gRPC reports it as such
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
        return NoLiveWorker("workers", details, "retry; the mesh moves requests off failed workers")
    return ServiceError("worker", details, "see the worker's log")
