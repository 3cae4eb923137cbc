"""The Decode service: reserve blocks for a hand-off, stream the continuation, release.

Reserve holds blocks under a lease and registers the ticket with the KV transport; Generate
commits the ticket (the request joins the continuous batch once its last layer has landed) or,
with local_prefill, computes the prompt here; Release aborts. A lease that ends before Generate
frees everything by itself, so a scheduler that vanishes mid-transaction strands nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog

from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequest
from engine.request import FinishReason
from kvtransfer.receiver import KVTicketImport
from kvtransfer.transport import KVTransport
from pdmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.status import LeaseExpired, TicketNotFound
from services.worker.convert import chunk_from_output, sampling_from_pb, token_ids_from_pb, usage_of
from services.worker.failures import transfer_failed

log = structlog.get_logger(__name__)
_EXPIRED_MEMORY = 4096  # expired ticket ids remembered, so a late Generate hears "expired", not "unknown"


@dataclass(eq=False)
class Reservation:
    ticket_id: str
    landing: KVTicketImport
    expiry_unix_ms: int
    timer: asyncio.TimerHandle


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: AsyncEngine, transport: KVTransport, worker_id: str, lease_ms: int) -> None:
        self.engine = engine
        self.transport = transport
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self.reservations: dict[str, Reservation] = {}
        self._expired: dict[str, None] = {}

    async def Reserve(  # noqa: N802 (gRPC method name)
        self, request: decode_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReserveResponse:
        if request.num_tokens < 1:
            raise InvalidRequest("num_tokens", f"is {request.num_tokens}", "reserve at least one token")
        lease_ms = request.lease_ms or self.lease_ms
        ticket_id = f"{self.worker_id}/{request.request_id or 'anon'}/{uuid.uuid4().hex[:12]}"
        blocks = await self.engine.reserve(ticket_id, request.num_tokens)
        try:
            landing = await self.transport.expect_async(ticket_id, blocks, request.num_tokens, lease_ms / 1000)
        except BaseException:
            await self.engine.abort(ticket_id)
            raise
        expiry = int(time.time() * 1000) + lease_ms
        timer = asyncio.get_running_loop().call_later(lease_ms / 1000, self._expire, ticket_id)
        self.reservations[ticket_id] = Reservation(ticket_id, landing, expiry, timer)
        ticket = common_pb2.KVTicket(
            ticket_id=ticket_id,
            decode_worker_id=self.worker_id,
            kv_transfer_address=self.transport.address,
            num_tokens=request.num_tokens,
            num_blocks=len(blocks),
            lease_expiry_unix_ms=expiry,
        )
        return decode_pb2.ReserveResponse(ticket=ticket)

    async def Generate(  # noqa: N802
        self, request: decode_pb2.DecodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeGenerateResponse]:
        prompt = token_ids_from_pb(request.prompt_token_ids, "prompt_token_ids")
        prior = token_ids_from_pb(request.output_token_ids, "output_token_ids")
        params = sampling_from_pb(request.sampling)
        if request.WhichOneof("kv_source") == "ticket_id":
            reservation = self._commit(request.ticket_id, len(prompt))
            engine_id, landing = reservation.ticket_id, reservation.landing
        else:
            engine_id, landing = f"{self.worker_id}/{request.request_id}/local-{uuid.uuid4().hex[:8]}", None
        start = time.monotonic()
        stream = self.engine.generate(engine_id, prompt, params, prior_output_ids=prior, kv_import=landing)
        async for out in stream:
            if out.finish_reason is FinishReason.ERROR:
                raise transfer_failed(landing, out.error)
            response = decode_pb2.DecodeGenerateResponse(chunk=chunk_from_output(out))
            if out.finished:
                response.usage.CopyFrom(usage_of(out, decode_s=time.monotonic() - start))
            yield response

    async def Release(  # noqa: N802
        self, request: decode_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReleaseResponse:
        reservation = self.reservations.pop(request.ticket_id, None)
        if reservation is None:
            return decode_pb2.ReleaseResponse(released=False)
        await self._drop(reservation, "released by the scheduler")
        return decode_pb2.ReleaseResponse(released=True)

    def _commit(self, ticket_id: str, num_prompt_tokens: int) -> Reservation:
        reservation = self.reservations.pop(ticket_id, None)
        if reservation is None:
            if ticket_id in self._expired:
                raise LeaseExpired("ticket_id", f"{ticket_id!r} expired before Generate", "reserve again")
            raise TicketNotFound("ticket_id", f"{ticket_id!r} is not reserved here", "reserve first")
        reservation.timer.cancel()
        if reservation.landing.info.num_tokens != num_prompt_tokens:
            asyncio.get_running_loop().create_task(self._drop(reservation, "prompt length mismatch"))
            raise InvalidRequest(
                "prompt_token_ids",
                f"has {num_prompt_tokens} tokens, the ticket reserved {reservation.landing.info.num_tokens}",
                "send the prompt the ticket was reserved for",
            )
        return reservation

    def _expire(self, ticket_id: str) -> None:
        reservation = self.reservations.pop(ticket_id, None)
        if reservation is None:
            return
        self._expired[ticket_id] = None
        while len(self._expired) > _EXPIRED_MEMORY:
            self._expired.pop(next(iter(self._expired)))
        log.info("lease expired", ticket_id=ticket_id)
        asyncio.get_running_loop().create_task(self._drop(reservation, "lease expired"))

    async def _drop(self, reservation: Reservation, reason: str) -> None:
        reservation.timer.cancel()
        reservation.landing.cancel(reason)  # after this returns nothing writes the blocks
        with contextlib.suppress(Exception):
            await self.engine.abort(reservation.ticket_id)

    async def close(self) -> None:
        for reservation in list(self.reservations.values()):
            await self._drop(reservation, "worker shutting down")
        self.reservations.clear()
