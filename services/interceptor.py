"""The interceptor every server runs: calls in flight counted (so draining can wait for the
last), new calls refused while draining, and every exception a servicer raises turned into a
status code (services/status.py) with a message naming the field, never a traceback; an
exception in no table is a bug, logged with an error id the client gets. A request whose bytes do
not parse (a string that is not UTF-8) is INVALID_ARGUMENT naming the field (services/convert_wire).
An exception that says when to retry (`retry_after_s`) also sends a RetryInfo
(services/convert_status.py).

Unary and streaming calls alike, errors raised mid-stream included.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog

from engine.errors import InvalidRequest
from services.convert_status import rich_status
from services.convert_wire import lenient_deserializer
from services.status import typed_code

log = structlog.get_logger(__name__)


class InFlight:
    """Counts calls in flight so that draining can wait for the last one."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()


def status_of(exc: Exception, method: str) -> grpc.Status:
    """The status a client gets for an exception a servicer raised."""
    code = typed_code(exc)
    if code is not None:
        log.info("call refused", method=method, code=code.name, error=str(exc))
        return rich_status(code, str(exc), getattr(exc, "retry_after_s", None))
    error_id = uuid.uuid4().hex[:12]
    log.error("call failed", method=method, error_id=error_id, exc_info=exc)
    return rich_status(grpc.StatusCode.INTERNAL, f"internal error {error_id}; the server log has the details")


def _raise_undecodable(request: Any) -> None:
    if isinstance(request, InvalidRequest):  # what lenient_deserializer made of unparsable bytes
        raise request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Refuses new calls while draining, counts calls in flight, and maps exceptions to statuses.
    Calls whose method starts with one of `passthrough` (health, reflection) are left alone; those
    starting with one of `open_while_draining` (the scheduler's Registry: workers keep reporting
    while it drains its streams) are accepted while draining and not counted as work in flight."""

    def __init__(
        self, in_flight: InFlight, passthrough: tuple[str, ...], open_while_draining: tuple[str, ...] = ()
    ) -> None:
        self._in_flight = in_flight
        self._passthrough = passthrough
        self._open_while_draining = open_while_draining

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(self._passthrough):
            return handler
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary or handler.unary_stream:
            # Parsed here, a request that does not parse is refused inside the call (_guard).
            codecs["request_deserializer"] = lenient_deserializer(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method), **codecs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method), **codecs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method), **codecs
            )
        return grpc.stream_stream_rpc_method_handler(self._streaming(handler.stream_stream, method), **codecs)

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guard(method, context):
                _raise_undecodable(request)
                return await behavior(request, context)

        return call

    def _streaming(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._guard(method, context):
                _raise_undecodable(request)
                responses = behavior(request, context)
                if inspect.isawaitable(responses):  # the servicer writes with context.write()
                    await responses
                    return
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        yield response

        return call

    @contextlib.asynccontextmanager
    async def _guard(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        counted = not method.startswith(self._open_while_draining)
        if counted and self._in_flight.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another worker")
        if counted:
            self._in_flight.enter()
        try:
            yield
        except grpc.aio.AbortError:  # the servicer aborted with its own status
            raise
        except Exception as exc:
            status = status_of(exc, method)
            await context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            if counted:
                self._in_flight.exit()


class StreamCloser(grpc.aio.ServerInterceptor):
    """Closes every streaming handler's generator in its own call's task.

    grpc aio iterates a streaming handler's async generator and, when a write fails (the client
    went away, the call was cancelled between two responses), leaves it suspended: the garbage
    collector finalizes it later in another context, where OpenTelemetry's server span cannot
    detach its context — an ERROR with a traceback for every such stream (grpc/grpc#42295).
    Outermost, this drives each stream itself with context.write, so any failure surfaces here,
    in the call's task, and the generator is closed there."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.unary_stream:
            return handler
        behavior = handler.unary_stream

        async def drive(request: Any, context: grpc.aio.ServicerContext) -> None:
            responses = behavior(request, context)
            if inspect.isawaitable(responses):  # the servicer writes with context.write() itself
                await responses
                return
            async with contextlib.aclosing(responses):
                async for response in responses:
                    await context.write(response)

        return grpc.unary_stream_rpc_method_handler(
            drive, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
