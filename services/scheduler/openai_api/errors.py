"""Typed errors -> HTTP status and OpenAI's error shape, in one place for the HTTP door.

The gRPC door's table (services/status.py) classifies every typed error once; this module reads
that classification (its gRPC code) and turns it into the HTTP status the OpenAI API would use,
so an error class added for gRPC answers over HTTP too. A few errors mean something else to an
HTTP client than their code says and are named first (_BY_TYPE). The body is always

    {"error": {"message": "<field>: <problem>; <fix>", "type": ..., "param": <field>, "code": ...}}

and an exception in no table is a bug: 500 with an error id, the traceback in the log only.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from http import HTTPStatus

import grpc
import structlog

from engine.errors import InvalidRequest
from services.status import (
    ExceedsCapacity,
    LeaseExpired,
    ModelNotFound,
    ServiceError,
    TicketNotFound,
    typed_code,
)

log = structlog.get_logger(__name__)

DEFAULT_RETRY_AFTER_S = 1.0  # a refusal for load that names no better hint

_BY_TYPE: dict[type[BaseException], HTTPStatus] = {
    ExceedsCapacity: HTTPStatus.BAD_REQUEST,  # no worker could ever hold it: like a prompt over the context
    LeaseExpired: HTTPStatus.SERVICE_UNAVAILABLE,  # a hand-off lost inside the mesh: retry
    TicketNotFound: HTTPStatus.SERVICE_UNAVAILABLE,
}
_BY_CODE: dict[grpc.StatusCode, HTTPStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.ABORTED: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.NOT_IMPLEMENTED,
}
_TYPES: dict[HTTPStatus, str] = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.FORBIDDEN: "permission_error",
    HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "invalid_request_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "service_unavailable_error",
    HTTPStatus.GATEWAY_TIMEOUT: "timeout_error",
}


@dataclass(frozen=True)
class HttpError:
    """An error as the HTTP client gets it."""

    status: HTTPStatus
    message: str
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None  # sent as Retry-After (whole seconds, at least 1)

    @property
    def body(self) -> dict[str, object]:
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    @property
    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        if self.status is HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def http_error(exc: BaseException) -> HttpError:
    """What the client gets for an exception a request ended with."""
    status = _status(exc)
    if status is None:
        error_id = uuid.uuid4().hex[:12]
        log.error("request failed", error_id=error_id, exc_info=exc)
        return HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error {error_id}; the server log has the details")
    field = exc.field if isinstance(exc, InvalidRequest | ServiceError) else None
    retry_after = None
    if status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
        hint = exc.retry_after_s if isinstance(exc, ServiceError) else None  # the core's RetryInfo
        retry_after = hint if hint is not None else DEFAULT_RETRY_AFTER_S
    code = "model_not_found" if isinstance(exc, ModelNotFound) else _snake(type(exc).__name__)
    log.info("request refused", status=int(status), error=str(exc))
    return HttpError(status, str(exc), field, code, retry_after)


def _status(exc: BaseException) -> HTTPStatus | None:
    for cls in type(exc).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    code = typed_code(exc)
    if code is None:
        return None
    return _BY_CODE.get(code, HTTPStatus.INTERNAL_SERVER_ERROR)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
