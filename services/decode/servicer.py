"""The Decode service: reserve blocks for a hand-off, stream the continuation, release.

Thin: Reserve and Release go to the worker's Reservations; Generate commits a ticket there (the
request joins the continuous batch once its last layer has landed) or, with local_prefill,
computes the prompt here, and streams the engine's outputs back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from engine.async_engine import AsyncEngine
from engine.request import FinishReason
from pdmesh.v1 import decode_pb2, decode_pb2_grpc
from services.decode.reservations import Reservations, import_failure
from services.worker.convert import chunk_from_output, sampling_from_pb, ticket_to_pb, usage_of


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: AsyncEngine, reservations: Reservations, worker_id: str) -> None:
        self.engine = engine
        self.reservations = reservations
        self.worker_id = worker_id

    async def Reserve(  # noqa: N802 (gRPC method name)
        self, request: decode_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReserveResponse:
        ticket = await self.reservations.reserve(request.request_id, request.num_tokens, request.lease_ms)
        return decode_pb2.ReserveResponse(ticket=ticket_to_pb(ticket))

    async def Generate(  # noqa: N802
        self, request: decode_pb2.DecodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeGenerateResponse]:
        prompt, prior = list(request.prompt_token_ids), list(request.output_token_ids)
        params = sampling_from_pb(request.sampling)
        if request.WhichOneof("kv_source") == "ticket_id":
            engine_id, imported = request.ticket_id, self.reservations.commit(request.ticket_id, len(prompt))
        else:
            engine_id, imported = f"{self.worker_id}/{request.request_id}/local-{uuid.uuid4().hex[:8]}", None
        start = time.monotonic()
        stream = self.engine.generate(engine_id, prompt, params, prior_output_ids=prior, kv_import=imported)
        async for out in stream:
            if out.finish_reason is FinishReason.ERROR:
                raise import_failure(imported, out.error)
            response = decode_pb2.DecodeGenerateResponse(chunk=chunk_from_output(out))
            if out.finished:
                response.usage.CopyFrom(usage_of(out, decode_s=time.monotonic() - start))
            yield response

    async def Release(  # noqa: N802
        self, request: decode_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReleaseResponse:
        return decode_pb2.ReleaseResponse(released=await self.reservations.release(request.ticket_id))
