"""Typed service errors and the one table that turns any typed error into a gRPC status.

Servicers raise typed exceptions (these, engine.errors, kvtransfer's TransferFailed) and never
call context.abort themselves; the interceptor in services/bootstrap.py asks `status_for` for the
code and the message the client sees. The message is the exception's own text, which by
convention reads "<field>: <problem>; <fix>". An exception that is in no table is a bug: the
client gets INTERNAL with a generic message and an error id, the log gets the traceback.
"""

from __future__ import annotations

import grpc

from engine.errors import DeviceLost, InvalidRequest, ModelLoadError, OutOfBlocks, RequestNotFound


class ServiceError(Exception):
    """Base of the errors services raise on purpose. Same shape as engine.errors.InvalidRequest."""

    # When a refusal for load knows when capacity should return: gRPC clients get it as a
    # google.rpc.RetryInfo, HTTP clients as Retry-After. None: no hint.
    retry_after_s: float | None = None

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


class TicketNotFound(ServiceError):
    """No ticket with this id is held here (released, committed or never reserved). NOT_FOUND."""


class LeaseExpired(ServiceError):
    """The ticket's lease ran out before Decode.Generate committed it. FAILED_PRECONDITION."""


class NoCapacity(ServiceError):
    """No worker can take the request now, or no plan meets its SLO. RESOURCE_EXHAUSTED."""


class ExceedsCapacity(NoCapacity):
    """No worker could ever hold the request (more KV than the largest decode cache): retrying
    will not help. RESOURCE_EXHAUSTED on gRPC; the HTTP door answers 400, as for a prompt over
    the context length."""


class SloUnattainable(NoCapacity):
    """No plan is predicted to meet the request's SLO now (RESOURCE_EXHAUSTED, refused before any
    work). `retry_after_s` is when capacity is predicted to return: the client sees it as a
    google.rpc.RetryInfo in the status details (HTTP: Retry-After)."""

    def __init__(self, field: str, problem: str, fix: str, retry_after_s: float | None) -> None:
        super().__init__(field, problem, fix)
        self.retry_after_s = retry_after_s


class SloOutOfReach(ServiceError):
    """The request's SLO is out of reach even on idle workers (its prompt alone takes longer than
    its TTFT target, a lone decode step longer than its TPOT target): the request must change, a
    retry cannot help. OUT_OF_RANGE (HTTP 400), the message naming the target and the predicted
    best."""


class NoLiveWorker(ServiceError):
    """No worker of the needed role and model is serving. UNAVAILABLE."""


class ModelNotFound(ServiceError):
    """No served model has this name. NOT_FOUND."""


class Unauthenticated(ServiceError):
    """The caller presented no valid key where the door requires one. UNAUTHENTICATED."""


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed while a downstream worker was busy with it. DEADLINE_EXCEEDED."""


class StaleBlock(ServiceError):
    """A KV store block is gone, or holds another generation than the one looked up: refused,
    never served stale. FAILED_PRECONDITION."""


_BY_TYPE: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfBlocks: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestNotFound: grpc.StatusCode.NOT_FOUND,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    TicketNotFound: grpc.StatusCode.NOT_FOUND,
    LeaseExpired: grpc.StatusCode.FAILED_PRECONDITION,
    NoCapacity: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SloOutOfReach: grpc.StatusCode.OUT_OF_RANGE,
    NoLiveWorker: grpc.StatusCode.UNAVAILABLE,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    StaleBlock: grpc.StatusCode.FAILED_PRECONDITION,
    # The worker's device is lost and the worker is going: as for a dead worker, the scheduler
    # moves the request (a decode stream to another decode worker, with the tokens so far).
    DeviceLost: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

# Errors of packages that the servers must not import just to map them (kvtransfer pulls in
# ucxx), matched by (top-level package, class name) along the exception's MRO.
# TransferFailed is UNAVAILABLE: the peer or the link failed, and the scheduler retries the
# hand-off elsewhere.
_BY_NAME: dict[tuple[str, str], grpc.StatusCode] = {
    ("kvtransfer", "TransferFailed"): grpc.StatusCode.UNAVAILABLE,
}


def typed_code(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a typed error, or None when `exc` is in no table (a bug)."""
    for cls in type(exc).__mro__:
        code = _BY_TYPE.get(cls) or _BY_NAME.get((cls.__module__.partition(".")[0], cls.__name__))
        if code is not None:
            return code
    return None
