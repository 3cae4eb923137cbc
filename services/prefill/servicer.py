"""The Prefill service: compute a prompt's KV (after taking what the worker's own cache and the KV
store hold of it), push it layer by layer to the ticket's decode worker while later layers
compute, and answer with the first token.

The answer comes only after every layer has landed on the decode worker, so an OK reply means
the hand-off can be committed. Concurrent Prefill calls share the engine's batches. A cancelled
call aborts the request, which cancels its push and tells the receiver.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc

from engine.async_engine import AsyncEngine
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from kvtransfer.sender import KVPush
from kvtransfer.transport import KVTransport
from pdmesh.v1 import prefill_pb2, prefill_pb2_grpc
from services.logging import request_context
from services.worker.convert import chunk_from_output, priority_rank, sampling_from_pb, ticket_from_pb
from services.worker.prefix_fetch import PrefixFetcher
from services.worker.samples import Pushes
from services.worker.telemetry import PrefillTimes, WorkerTelemetry


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(
        self, engine: AsyncEngine, transport: KVTransport, prefixes: PrefixFetcher, worker_id: str,
        telemetry: WorkerTelemetry,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.transport = transport
        self.prefixes = prefixes
        self.worker_id = worker_id
        self.telemetry = telemetry
        self.pushes = Pushes()

    async def Prefill(  # noqa: N802 (gRPC method name)
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        with request_context(request.request_id):
            return await self._prefill(request, context.time_remaining())

    async def _prefill(
        self, request: prefill_pb2.PrefillRequest, time_left_s: float | None
    ) -> prefill_pb2.PrefillResponse:
        prompt = list(request.prompt_token_ids)
        params = sampling_from_pb(request.sampling)
        push = self.transport.push(ticket_from_pb(request.ticket))
        start = time.monotonic()
        try:
            priority = priority_rank(request.priority)
            first = await self._first_token(request.request_id, prompt, params, push, time_left_s, priority)
        except BaseException as exc:  # refused, cancelled or failed: the receiver must not wait for its lease
            push.cancel(f"prefill ended early: {type(exc).__name__}")
            raise
        computed = time.monotonic()
        stats = await push  # raises TransferFailed if the receiver did not get every layer
        done = time.monotonic()
        times = PrefillTimes(start, start + (first.queue_s or 0.0), computed)
        cached = first.num_cached_tokens + first.num_imported_tokens  # its own cache's and the store's
        self.telemetry.prefilled(times, first.num_prompt_tokens, cached, request.request_id)
        self.telemetry.pushed(stats, computed, done, request.request_id)
        exposed = done - computed  # the part of the push not hidden behind compute
        self.pushes.record(stats.bytes, exposed * 1000)
        return prefill_pb2.PrefillResponse(
            chunk=chunk_from_output(first),  # finish set only when the generation ended at its first token
            cached_prompt_tokens=cached,
            store_cached_prompt_tokens=first.num_imported_tokens,
            queue_ms=(times.computing - times.arrived) * 1000,
            prefill_ms=(times.first_token - times.computing) * 1000,
            transfer_bytes=stats.bytes,
            transfer_ms=exposed * 1000,
            transfer_overlap_ms=max(0.0, stats.seconds - exposed) * 1000,
        )

    async def _first_token(
        self, request_id: str, prompt: Sequence[int], params: SamplingParams, push: KVPush, time_left_s: float | None,
        priority: int,
    ) -> RequestOutput:
        engine_id = f"{self.worker_id}/{request_id}/prefill-{time.monotonic_ns()}"
        last: RequestOutput | None = None
        outputs = self.prefixes.generate(
            engine_id, prompt, params, kv_export=push, prefill_only=True, time_left_s=time_left_s, priority=priority
        )
        async for out in outputs:
            last = out
        assert last is not None and last.finished
        return last
