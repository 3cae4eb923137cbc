"""The scheduler's calls to prefill and decode workers: scheduler types in, scheduler types out.

Each call runs on the worker's channel (built from the scheduler's ChannelConfig), bounded by the
timeout the caller gives, and any gRPC failure comes back as DownstreamFailed naming the worker,
the status code and the phase, for retry.classify. Cancelling the caller cancels the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

import grpc

from pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2_grpc
from services.scheduler import convert_workers as convert
from services.scheduler.errors import DownstreamFailed
from services.scheduler.registry import Worker
from services.scheduler.request import Decoded, Prefilled, SchedulerRequest, TicketHandle
from services.scheduler.retry import Phase

T = TypeVar("T")
_RELEASE_TIMEOUT_S = 5.0


async def reserve(worker: Worker, request: SchedulerRequest, lease_ms: int, timeout: float | None) -> TicketHandle:
    stub = decode_pb2_grpc.DecodeStub(worker.channel)
    reply = await _unary(worker, Phase.RESERVE, stub.Reserve(convert.reserve_to_pb(request, lease_ms), timeout=timeout))
    return convert.ticket_from_pb(reply)


async def prefill(worker: Worker, request: SchedulerRequest, ticket: TicketHandle, timeout: float | None) -> Prefilled:
    stub = prefill_pb2_grpc.PrefillStub(worker.channel)
    reply = await _unary(worker, Phase.PREFILL, stub.Prefill(convert.prefill_to_pb(request, ticket), timeout=timeout))
    return convert.prefilled_from_pb(reply, request.num_prompt_tokens)


async def generate(
    worker: Worker, request: SchedulerRequest, outputs: list[int], ticket: TicketHandle | None, timeout: float | None
) -> AsyncGenerator[Decoded, None]:
    """The decode stream, to its last chunk. With a ticket the call commits it: a failure before
    anything arrived is a COMMIT failure; any other is a DECODE failure, as is a stream that ends
    without a finish."""
    stub = decode_pb2_grpc.DecodeStub(worker.channel)
    call = stub.Generate(convert.decode_to_pb(request, outputs, ticket), timeout=timeout)
    phase = Phase.COMMIT if ticket is not None else Phase.DECODE
    finished = False
    try:
        async for pb in call:
            phase = Phase.DECODE
            decoded = convert.decoded_from_pb(pb)
            finished = finished or decoded.usage is not None
            yield decoded
        # Read on to the stream's end after the last chunk: it follows at once, and the call's
        # trace span ends only there.
    except grpc.aio.AioRpcError as e:
        if not finished:
            raise DownstreamFailed(worker, e.code(), e.details() or "", phase) from None
    finally:
        call.cancel()  # leaving early (client gone): the worker aborts the request
    if not finished:
        raise DownstreamFailed(worker, grpc.StatusCode.UNAVAILABLE, "the decode stream ended without a finish", phase)


async def release(worker: Worker, ticket_id: str) -> None:
    """Free an uncommitted ticket, best effort: a failure leaves it to its lease."""
    stub = decode_pb2_grpc.DecodeStub(worker.channel)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.Release(decode_pb2.ReleaseRequest(ticket_id=ticket_id), timeout=_RELEASE_TIMEOUT_S)


async def _unary(worker: Worker, phase: Phase, call: Awaitable[T]) -> T:
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise DownstreamFailed(worker, e.code(), e.details() or "", phase) from None
