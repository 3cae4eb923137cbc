"""Scripted prefill and decode workers: the scheduler's test doubles, on real loopback servers.

Each serves the real Prefill or Decode service through the bootstrap server, registers and
reports load through the real worker Reporter, and records every call it gets. Tokens follow the
real sampler's contract: the token at each position is a function of (seed, position) alone, so
a request resumed elsewhere with the same seed continues identically, and a wrong seed shows.
A test scripts a worker by setting its attributes (hang, fail_after, full...) before the call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from pdmesh.config import ServerConfig
from pdmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc, worker_pb2
from services.bootstrap import Server, ServicerBinding
from services.worker.registry_client import Reporter

KV_BLOCKS = 64
BLOCK_SIZE = 16
MAX_MODEL_LEN = 512
LAYOUT = common_pb2.KVLayout(
    model_fingerprint="scripted-fp", dtype="float32", block_size_tokens=BLOCK_SIZE, num_layers=2,
    num_kv_heads=2, head_dim=8, layout_version=1,
)  # fmt: skip


def token_at(seed: int, position: int) -> int:
    """The scripted sampler: the token at `position` (its index in prompt + output) for `seed`."""
    return 10 + (seed * 31 + position * 7) % 200


def expected_tokens(seed: int, num_prompt_tokens: int, max_tokens: int) -> list[int]:
    return [token_at(seed, num_prompt_tokens + i) for i in range(max_tokens)]


def _max_tokens(sampling: common_pb2.SamplingParams) -> int:
    return sampling.max_tokens if sampling.HasField("max_tokens") else 64


class ScriptedPrefill(prefill_pb2_grpc.PrefillServicer):
    def __init__(self) -> None:
        self.calls: list[prefill_pb2.PrefillRequest] = []
        self.time_remaining: list[float | None] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.hang = False  # never answer (until cancelled)
        self.fail_code: grpc.StatusCode | None = None  # answer with this status

    async def Prefill(  # noqa: N802
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        self.calls.append(request)
        self.time_remaining.append(context.time_remaining())
        self.started.set()
        try:
            if self.hang:
                await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.fail_code is not None:
            await context.abort(self.fail_code, "kv_transfer_address: the push to the decode worker failed")
        position = len(request.prompt_token_ids)
        chunk = common_pb2.TokenChunk(token_ids=[token_at(request.sampling.seed, position)], text=f"<{position}>")
        if _max_tokens(request.sampling) == 1:
            chunk.finish.reason = common_pb2.FINISH_REASON_LENGTH
        return prefill_pb2.PrefillResponse(
            chunk=chunk, cached_prompt_tokens=16, queue_ms=1.5, prefill_ms=7.0, transfer_bytes=4096, transfer_ms=0.5
        )


class ScriptedDecode(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.reserves: list[decode_pb2.ReserveRequest] = []
        self.generates: list[decode_pb2.DecodeGenerateRequest] = []
        self.releases: list[str] = []
        self.time_remaining: list[float | None] = []
        self.held: set[str] = set()  # tickets reserved and neither committed nor released
        self.streaming = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.full = False  # Reserve answers RESOURCE_EXHAUSTED
        self.leases_expire = False  # a ticket is gone by the time Generate commits it
        self.fail_after: int | None = None  # Generate dies (UNAVAILABLE) after this many chunks
        self.token_delay_s = 0.0
        self.reserve_delay_s = 0.0
        self.running = 0

    async def Reserve(  # noqa: N802
        self, request: decode_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReserveResponse:
        self.reserves.append(request)
        self.time_remaining.append(context.time_remaining())
        await asyncio.sleep(self.reserve_delay_s)
        if self.full:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "num_tokens: no free KV blocks; retry later")
        ticket_id = f"{self.worker_id}/t{len(self.reserves)}"
        self.held.add(ticket_id)
        ticket = common_pb2.KVTicket(
            ticket_id=ticket_id, kv_transfer_address="127.0.0.1:9",
            num_tokens=request.num_tokens, num_blocks=-(-request.num_tokens // BLOCK_SIZE),
            lease_expiry_unix_ms=1,
        )  # fmt: skip
        return decode_pb2.ReserveResponse(ticket=ticket)

    async def Generate(  # noqa: N802
        self, request: decode_pb2.DecodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.DecodeGenerateResponse]:
        self.generates.append(request)
        self.time_remaining.append(context.time_remaining())
        if request.WhichOneof("kv_source") == "ticket_id":
            if self.leases_expire:
                self.held.discard(request.ticket_id)
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"ticket_id: {request.ticket_id!r} expired before Generate"
                )
            if request.ticket_id not in self.held:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"ticket_id: {request.ticket_id} is not reserved here")
            self.held.discard(request.ticket_id)
        seed, prompt, prior = request.sampling.seed, len(request.prompt_token_ids), len(request.output_token_ids)
        max_tokens = _max_tokens(request.sampling)
        self.running += 1
        try:
            for sent, i in enumerate(range(prior, max_tokens)):
                if self.fail_after is not None and sent == self.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the decode worker went away")
                if sent:
                    await asyncio.sleep(self.token_delay_s)
                response = decode_pb2.DecodeGenerateResponse(
                    chunk=common_pb2.TokenChunk(token_ids=[token_at(seed, prompt + i)], text=f"<{prompt + i}>")
                )
                if i == max_tokens - 1:
                    response.chunk.finish.reason = common_pb2.FINISH_REASON_LENGTH
                    response.usage.CopyFrom(common_pb2.Usage(completion_tokens=max_tokens, decode_ms=3.0))
                    if prior:
                        # A request taken over after a failover, counted as a real worker counts
                        # it: over prompt and output so far, 8 tokens its own cache held and the
                        # rest a KV store had (the scripted store holds every token).
                        own = min(8, prompt + prior)
                        response.usage.MergeFrom(common_pb2.Usage(
                            prompt_tokens=prompt, cached_prompt_tokens=prompt + prior, worker_cached_prompt_tokens=own,
                            store_cached_prompt_tokens=prompt + prior - own,
                        ))  # fmt: skip
                self.streaming.set()
                yield response
        except (asyncio.CancelledError, GeneratorExit):  # cancelled while waiting, or between writes
            self.cancelled.set()
            raise
        finally:
            self.running -= 1

    async def Release(  # noqa: N802
        self, request: decode_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.ReleaseResponse:
        self.releases.append(request.ticket_id)
        released = request.ticket_id in self.held
        self.held.discard(request.ticket_id)
        return decode_pb2.ReleaseResponse(released=released)


@dataclass
class ScriptedWorker:
    """A scripted servicer on its own loopback server, registered with the scheduler."""

    worker_id: str
    role: int  # worker_pb2.WORKER_ROLE_*
    servicer: ScriptedPrefill | ScriptedDecode
    server: Server
    reporter: Reporter | None = None
    free_blocks: int = KV_BLOCKS  # what its load reports say
    cached: tuple[int, ...] = ()  # the block hashes its reports say its prefix cache holds
    step_samples: tuple[worker_pb2.StepSample, ...] = ()  # the engine steps every report says it measured

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def info(self, model: str) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id, role=self.role, address=self.address,  # type: ignore[arg-type]
            kv_transfer_address="127.0.0.1:9" if self.role == worker_pb2.WORKER_ROLE_DECODE else "",
            model=model, kv_layout=LAYOUT, device="cpu", version="test",
            capacity=worker_pb2.WorkerCapacity(
                num_kv_blocks_total=KV_BLOCKS, max_num_running_requests=8, max_num_batched_tokens=256,
                max_model_len_tokens=MAX_MODEL_LEN,
            ),
        )  # fmt: skip

    async def load(self, snapshot: bool) -> worker_pb2.ReportLoadRequest:
        running = self.servicer.running if isinstance(self.servicer, ScriptedDecode) else 0
        return worker_pb2.ReportLoadRequest(
            num_kv_blocks_free=self.free_blocks, num_kv_blocks_total=KV_BLOCKS, num_running_requests=running,
            kv_cache_events=worker_pb2.KVCacheEvents(is_snapshot=True, block_hashes_stored=self.cached),
            step_samples=self.step_samples,
        )  # fmt: skip

    def start_reporting(self, scheduler: str, model: str) -> None:
        self.reporter = Reporter(scheduler, self.info(model), self.load)
        self.reporter.start()

    async def stop_reporting(self) -> None:
        if self.reporter is not None:
            await self.reporter.stop()
            self.reporter = None

    async def kill(self) -> None:
        """The process dies: reports stop and calls in flight end with UNAVAILABLE."""
        await self.stop_reporting()
        await self.server.stop()


async def start_worker(worker_id: str, role: int) -> ScriptedWorker:
    servicer: ScriptedPrefill | ScriptedDecode
    if role == worker_pb2.WORKER_ROLE_PREFILL:
        servicer = ScriptedPrefill()
        binding = ServicerBinding(
            servicer, prefill_pb2_grpc.add_PrefillServicer_to_server, prefill_pb2.DESCRIPTOR.services_by_name["Prefill"]
        )
    else:
        servicer = ScriptedDecode(worker_id)
        binding = ServicerBinding(
            servicer, decode_pb2_grpc.add_DecodeServicer_to_server, decode_pb2.DESCRIPTOR.services_by_name["Decode"]
        )
    server = Server([binding], ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=0.05))
    await server.start()
    await server.set_serving()
    return ScriptedWorker(worker_id, role, servicer, server)


async def stop_worker(worker: ScriptedWorker) -> None:
    await worker.stop_reporting()
    with contextlib.suppress(AssertionError):
        await worker.server.stop()
