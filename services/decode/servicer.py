"""The Decode service: reserve blocks for a hand-off, stream the continuation, release.

Thin: Reserve and Release go to the worker's Reservations; Generate commits a ticket there (the
request joins the continuous batch once its last layer has landed) or, with local_prefill,
computes the prompt here (after taking what its own cache and the KV store hold of it: a request
moved here from a failed decode worker fetches its prompt rather than computing it), and streams
the engine's outputs back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog

from engine.async_engine import AsyncEngine
from engine.request import FinishReason, RequestOutput
from pdmesh.v1 import decode_pb2, decode_pb2_grpc
from services.decode.reservations import Reservations, import_failure
from services.logging import request_context
from services.telemetry.spans import traceparent
from services.worker.convert import chunk_from_output, priority_rank, sampling_from_pb, ticket_to_pb, usage_of
from services.worker.prefix_fetch import PrefixFetcher
from services.worker.telemetry import DecodeTimes, LandingClock, PrefillTimes, WorkerTelemetry

log = structlog.get_logger(__name__)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(
        self, engine: AsyncEngine, reservations: Reservations, prefixes: PrefixFetcher, worker_id: str,
        telemetry: WorkerTelemetry,
    ) -> None:
        self.engine = engine
        self.reservations = reservations
        self.prefixes = prefixes
        self.worker_id = worker_id
        self.telemetry = telemetry

    async def Reserve(  # noqa: N802 (gRPC method name)
        self, request: decode_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReserveResponse:
        with request_context(request.request_id):
            ticket = await self.reservations.reserve(request.request_id, request.num_tokens, request.lease_ms)
        # The KV hop carries the request's trace context, for the transfer's spans on both sides.
        ticket = dataclasses.replace(ticket, traceparent=traceparent())
        self.telemetry.expecting(ticket)
        log.debug("reserved", ticket_id=ticket.ticket_id, blocks=ticket.num_blocks, request_id=request.request_id)
        return decode_pb2.ReserveResponse(ticket=ticket_to_pb(ticket))

    async def Generate(  # noqa: N802
        self, request: decode_pb2.DecodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeGenerateResponse]:
        with request_context(request.request_id):
            async for response in self._generate(request, context.time_remaining()):
                yield response

    async def _generate(
        self, request: decode_pb2.DecodeGenerateRequest, time_left_s: float | None
    ) -> AsyncIterator[decode_pb2.DecodeGenerateResponse]:
        prompt, prior = list(request.prompt_token_ids), list(request.output_token_ids)
        params = sampling_from_pb(request.sampling)
        priority = priority_rank(request.priority)
        imported = None
        if request.WhichOneof("kv_source") == "ticket_id":
            imported = self.reservations.commit(request.ticket_id, len(prompt))
            stream = self.engine.generate(
                request.ticket_id, prompt, params, prior_output_ids=prior, kv_import=imported, priority=priority
            )
        else:
            engine_id = f"{self.worker_id}/{request.request_id}/local-{uuid.uuid4().hex[:8]}"
            stream = self.prefixes.generate(
                engine_id, prompt, params, prior_output_ids=prior, time_left_s=time_left_s, priority=priority
            )
        start = time.monotonic()
        landing = LandingClock(imported.future) if imported is not None else None
        first: float | None = None
        num_tokens = 0
        async with contextlib.aclosing(stream):
            async for out in stream:
                if out.finish_reason is FinishReason.ERROR:
                    raise import_failure(imported, out.error)
                now = time.monotonic()
                first = now if first is None and out.new_token_ids else first
                num_tokens += len(out.new_token_ids)
                response = decode_pb2.DecodeGenerateResponse(chunk=chunk_from_output(out))
                if out.finished:
                    times = DecodeTimes(start, landing.at if landing else None, first or now, now)
                    prefill_s = self._finished(times, out, num_tokens, request.request_id)
                    usage = usage_of(out, handed_off=imported is not None, decode_s=now - start, prefill_s=prefill_s)
                    response.usage.CopyFrom(usage)
                yield response

    def _finished(self, times: DecodeTimes, out: RequestOutput, num_tokens: int, request_id: str) -> float | None:
        """Record a finished stream; the prefill time when this worker computed the prompt."""
        self.telemetry.decoded(times, num_tokens, request_id)
        if times.kv_landed is not None:
            return None
        prefill = PrefillTimes(times.arrived, times.arrived + (out.queue_s or 0.0), times.first_token)
        cached = out.num_cached_tokens + out.num_imported_tokens  # its own cache's and the store's
        self.telemetry.prefilled(prefill, out.num_prompt_tokens, cached, request_id)
        return prefill.first_token - prefill.computing

    async def Release(  # noqa: N802
        self, request: decode_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReleaseResponse:
        return decode_pb2.ReleaseResponse(released=await self.reservations.release(request.ticket_id))
