"""Trace context over gRPC: the OpenTelemetry interceptors that every pdmesh server and channel
installs (services/bootstrap.py and pdmesh/channel.py, nowhere else).

opentelemetry-instrumentation-grpc's aio interceptors carry the W3C traceparent in call metadata
and open a client span per outgoing call and a server span per incoming one, so the spans a
request leaves in every process join one trace. Plumbing is left out: health checks, reflection
and the workers' registration and load reports are not requests, and a trace per load report
would bury the traces that matter. The scheduler's Generate is left out on the server side too:
the scheduler opens that request's root span itself (`pdmesh.generate`), from the same metadata.

Without a configured tracer provider (the client library inside a program that does not use
OpenTelemetry, `pdmesh generate`) the API's no-op tracer makes the interceptors inject nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, full_method_name, negate, service_name

_PLUMBING = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "pdmesh.v1.Registry")
# Traced by the scheduler itself, whose request span is the root of the request's trace.
SCHEDULER_GENERATE = "/pdmesh.v1.Scheduler/Generate"


def _untraced(*extra: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return negate(any_of(*(service_name(s) for s in _PLUMBING), *extra))


def client_interceptors() -> Sequence[grpc.aio.ClientInterceptor]:
    """Interceptors for an asyncio channel: a client span per call, its context in the metadata."""
    return [*aio_client_interceptors(filter_=_untraced()), _CancelUnaryWithCaller(), _CancelStreamUnaryWithCaller()]


class _CancelUnaryWithCaller(grpc.aio.UnaryUnaryClientInterceptor):
    """Keeps a cancelled caller cancelling its call (open-telemetry/opentelemetry-python-contrib
    #3271): OpenTelemetry's unary interceptor awaits the call's status, not the call, so a caller
    cancelled meanwhile (a client gone, a scheduler moving on) would leave the RPC running on the
    worker. Placed after it, this awaits the call itself, which cancellation does reach."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        await call
        return call


class _CancelStreamUnaryWithCaller(grpc.aio.StreamUnaryClientInterceptor):
    """The same for client-streaming calls."""

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        call = await continuation(details, request_iterator)
        await call
        return call


def server_interceptor() -> grpc.aio.ServerInterceptor:
    """The interceptor for an asyncio server: a server span per call, child of the caller's."""
    return aio_server_interceptor(filter_=_untraced(full_method_name(SCHEDULER_GENERATE)))


def remote_context(metadata: Sequence[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The caller's trace context from a call's invocation metadata (empty when it sent none)."""
    carrier: Mapping[str, str] = {k: v for k, v in metadata or () if isinstance(v, str)}
    return propagate.extract(carrier)
