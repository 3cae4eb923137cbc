"""One request's life at the scheduler: place it, run the hand-off transaction, stream the
tokens back, and move it when a worker dies.

The transaction: Decode.Reserve (blocks under a lease) -> Prefill.Prefill(ticket) (which returns
once every layer has landed) -> Decode.Generate(ticket) commits; on any failure before the commit
the ticket is released (and its lease would free it anyway). A prefill worker that fails is
replaced by another, or by prefilling on the decode worker; a decode worker that fails mid-stream
is replaced by another decode worker that prefills prompt + output so far and continues with the
same seed, so the client sees one unbroken stream. Every downstream call gets the time left of
the client's deadline, and leaving this generator (client cancel) cancels every call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import structlog

from pdmesh.v1 import common_pb2, decode_pb2, prefill_pb2, scheduler_pb2
from services.scheduler.convert import ParsedRequest
from services.scheduler.errors import DownstreamFailed, from_rpc_error
from services.scheduler.policy import Plan, Policy, RequestShape
from services.scheduler.registry import Registry, Role, Worker
from services.status import NoCapacity, NoLiveWorker

log = structlog.get_logger(__name__)
T = TypeVar("T")
# A worker that is gone (UNAVAILABLE) or a KV transfer that failed (UNAVAILABLE, ABORTED): try elsewhere.
_RETRY_ELSEWHERE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
# A prefill may fail in more ways without the request being at fault: the worker shutting down
# (CANCELLED), hung (its own timeout), crashed mid-call (INTERNAL, UNKNOWN) or full. Each is worth
# another worker, or prefilling on the decode worker; only a full worker is not marked dead.
_PREFILL_RETRY = _RETRY_ELSEWHERE | {
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED,
}  # fmt: skip
# A committed ticket the decode worker no longer has (its lease ran out first): the worker is
# fine, so continue there by prefilling prompt + output so far.
_TICKET_LOST = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})


@dataclass
class _Measured:
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0
    transfer_bytes: int = 0
    cached_tokens: int = 0
    decode_ms: float = 0.0


class RequestFlow:
    def __init__(
        self,
        request: ParsedRequest,
        registry: Registry,
        policy: Policy,
        lease_ms: int,
        max_attempts: int,
        time_remaining: float | None,
        queue_timeout_s: float,
    ) -> None:
        self.request = request
        self.registry = registry
        self.policy = policy
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.deadline = None if time_remaining is None else time.monotonic() + time_remaining
        if request.slo.ttft_ms > 0:
            queue_timeout_s = min(queue_timeout_s, request.slo.ttft_ms / 1000)
        self.queue_timeout_s = queue_timeout_s
        self.shape = RequestShape(
            prompt_tokens=len(request.prompt_token_ids), cached_tokens=0, max_tokens=request.max_tokens,
            ttft_ms=request.slo.ttft_ms, tpot_ms=request.slo.tpot_ms,
        )  # fmt: skip
        self.outputs: list[int] = []
        self.measured = _Measured()
        self.placement = scheduler_pb2.Placement()
        self._calls: set[grpc.aio.Call] = set()
        self._open_ticket: tuple[Worker, str] | None = None
        self._held: list[Worker] = []

    # -- the flow ------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        try:
            plan = self._place(exclude=())
            stream = None
            for _ in range(self.max_attempts):
                if plan.local:
                    stream = self._decode_generate(plan.decode, local=True)
                    break
                try:
                    plan, first = await self._prefill(plan)
                except DownstreamFailed as failure:
                    plan = self._replan(plan, failure)
                    continue
                if first.chunk.HasField("finish"):  # ended at its first token
                    await self._release_open_ticket()
                    yield self._response(first.chunk, final=True)
                    return
                yield self._response(first.chunk, final=False)
                stream = self._decode_generate(plan.decode, local=False)
                break
            if stream is None:
                raise NoLiveWorker("workers", "every placement attempt failed", "check the workers' logs")
            self.placement.plan = common_plan(plan)
            async for response in self._stream_with_failover(stream, plan.decode):
                yield response
        finally:
            await self._cleanup()

    def _place(self, exclude: tuple[Worker, ...]) -> Plan:
        decode = self.registry.live(Role.DECODE, exclude)
        if not decode:
            raise NoLiveWorker("decode workers", "none is serving", "start a decode worker or wait for one")
        prefill = self.registry.live(Role.PREFILL, exclude)
        plan = self.policy.place(self.shape, prefill, decode)
        if plan.prefill is not None:  # a prefill worker may pair only with a decode worker of the same KV layout
            same = [w for w in prefill if w.info.kv_layout == plan.decode.info.kv_layout]
            plan = Plan(plan.decode, plan.prefill if plan.prefill in same else (same[0] if same else None))
        self.placement.plan = common_plan(plan)
        self.placement.decode_worker_id = plan.decode.worker_id
        self.placement.prefill_worker_id = plan.prefill.worker_id if plan.prefill else ""
        return plan

    def _replan(self, plan: Plan, failure: DownstreamFailed) -> Plan:
        log.warning("hand-off failed; placing again", worker=failure.worker.worker_id, reason=str(failure))
        if failure.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.registry.mark_dead(failure.worker)
        return self._place(exclude=(failure.worker,))

    async def _reserve(self, plan: Plan) -> tuple[Plan, common_pb2.KVTicket]:
        """A ticket on the plan's decode worker, or on another when its cache is full; when every
        cache is full, wait for blocks to free (backing off) until the queue timeout."""
        request = self.request
        reserve = decode_pb2.ReserveRequest(
            request_id=request.request_id, num_tokens=len(request.prompt_token_ids), lease_ms=self.lease_ms
        )
        give_up = time.monotonic() + self.queue_timeout_s
        delay = 0.01
        while True:
            candidates = [plan.decode] + [
                w for w in self.registry.live(Role.DECODE, exclude=(plan.decode,))
                if plan.prefill is not None and w.info.kv_layout == plan.prefill.info.kv_layout
            ]  # fmt: skip
            for worker in candidates:
                try:
                    call = worker.decode_stub().Reserve(reserve, timeout=self._timeout(10))
                    reply: decode_pb2.ReserveResponse = await self._unary(worker, call)
                except NoCapacity as full:
                    last_full = full
                    continue
                self.placement.decode_worker_id = worker.worker_id
                return Plan(worker, plan.prefill), reply.ticket
            left = self._timeout()
            if time.monotonic() + delay > give_up or (left is not None and left < delay):
                raise last_full
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _prefill(self, plan: Plan) -> tuple[Plan, prefill_pb2.PrefillResponse]:
        """Reserve on a decode worker, then prefill + push; the ticket stays open on success."""
        assert plan.prefill is not None
        plan, ticket = await self._reserve(plan)
        assert plan.prefill is not None
        self._open_ticket = (plan.decode, ticket.ticket_id)
        request = self.request
        prefill = prefill_pb2.PrefillRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=request.sampling, ticket=ticket,
        )  # fmt: skip
        try:
            call = plan.prefill.prefill_stub().Prefill(prefill, timeout=self._timeout())
            first: prefill_pb2.PrefillResponse = await self._unary(plan.prefill, call, _PREFILL_RETRY)
        except BaseException:
            await self._release_open_ticket()
            raise
        self.measured.first_token = time.monotonic()
        m = self.measured
        m.queue_ms, m.prefill_ms, m.transfer_ms = first.queue_ms, first.prefill_ms, first.transfer_ms
        m.transfer_bytes, m.cached_tokens = first.transfer_bytes, first.cached_prompt_tokens
        self.outputs += first.chunk.token_ids
        return plan, first

    def _decode_generate(self, worker: Worker, local: bool) -> grpc.aio.UnaryStreamCall:
        request = decode_pb2.DecodeGenerateRequest(
            request_id=self.request.request_id, prompt_token_ids=self.request.prompt_token_ids,
            output_token_ids=self.outputs, sampling=self.request.sampling,
        )  # fmt: skip
        if local:
            request.local_prefill.SetInParent()
        else:
            assert self._open_ticket is not None
            request.ticket_id = self._open_ticket[1]
            self._open_ticket = None  # Generate commits it: the decode worker owns it from here
        call = worker.decode_stub().Generate(request, timeout=self._timeout())
        self._calls.add(call)
        self._hold(worker)
        return call

    async def _stream_with_failover(
        self, call: grpc.aio.UnaryStreamCall, worker: Worker
    ) -> AsyncIterator[scheduler_pb2.GenerateResponse]:
        failovers = 0
        committed_ticket = True  # the first call commits the hand-off's ticket
        while True:
            received = 0
            try:
                async for response in call:
                    received += 1
                    if self.measured.first_token is None and response.chunk.token_ids:
                        self.measured.first_token = time.monotonic()
                    self.outputs += response.chunk.token_ids
                    final = response.HasField("usage")
                    if final:
                        self._absorb_decode_usage(response.usage)
                    yield self._response(response.chunk, final=final)
                    if final:
                        return
                raise DownstreamFailed(worker, grpc.StatusCode.UNAVAILABLE, "the decode stream ended without a finish")
            except grpc.aio.AioRpcError as e:
                if e.code() in _TICKET_LOST and committed_ticket and received == 0 and self.outputs:
                    log.warning("ticket lost before commit; prefilling on the decode worker", reason=e.details())
                    committed_ticket = False
                    call = self._decode_generate(worker, local=True)
                    continue
                if e.code() not in _RETRY_ELSEWHERE or failovers >= self.max_attempts:
                    raise from_rpc_error(e, worker) from None
                failure_reason = e.details()
            except DownstreamFailed as failure:
                if failovers >= self.max_attempts:
                    raise
                failure_reason = str(failure)
            finally:
                self._calls.discard(call)
            failovers += 1
            committed_ticket = False
            self.placement.num_decode_failovers = failovers
            log.warning("decode worker failed mid-stream; moving the request", worker=worker.worker_id,
                        reason=failure_reason, tokens_so_far=len(self.outputs))  # fmt: skip
            self.registry.mark_dead(worker)
            others = self.registry.live(Role.DECODE, exclude=(worker,))
            if not others:
                raise NoLiveWorker("decode workers", "the request's decode worker failed and no other is serving",
                                   "start another decode worker")  # fmt: skip
            worker = self.policy.place(self.shape, [], others).decode
            self.placement.decode_worker_id = worker.worker_id
            call = self._decode_generate(worker, local=True)

    # -- plumbing ------------------------------------------------------------------------------

    async def _unary(
        self,
        worker: Worker,
        call: grpc.aio.UnaryUnaryCall[Any, T],
        retry: frozenset[grpc.StatusCode] = _RETRY_ELSEWHERE,
    ) -> T:
        self._calls.add(call)
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
            if e.code() in retry and not out_of_time:
                raise DownstreamFailed(worker, e.code(), e.details() or "") from None
            raise from_rpc_error(e, worker) from None
        finally:
            self._calls.discard(call)

    def _timeout(self, cap_s: float | None = None) -> float | None:
        """The time left of the client's deadline (gRPC Python does not forward deadlines)."""
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if cap_s is None:
            return left
        return cap_s if left is None else min(cap_s, left)

    def _hold(self, worker: Worker) -> None:
        worker.assigned += 1
        self._held.append(worker)

    async def _release_open_ticket(self) -> None:
        """Release the uncommitted ticket. The Release runs as a task of its own, so a cancellation
        arriving now (client gone, deadline passed) cannot cut it short; the lease is the backstop."""
        if self._open_ticket is None:
            return
        worker, ticket_id = self._open_ticket
        self._open_ticket = None
        task = asyncio.ensure_future(_release(worker, ticket_id))
        _releases.add(task)
        task.add_done_callback(_releases.discard)
        await asyncio.shield(task)

    async def _cleanup(self) -> None:
        for call in list(self._calls):
            call.cancel()
        for worker in self._held:
            worker.assigned -= 1
        await self._release_open_ticket()

    def _absorb_decode_usage(self, usage: common_pb2.Usage) -> None:
        m = self.measured
        m.decode_ms = usage.decode_ms
        if m.cached_tokens == 0:
            m.cached_tokens = usage.cached_prompt_tokens
        if self.placement.plan == scheduler_pb2.EXECUTION_PLAN_LOCAL_PREFILL and not m.queue_ms:
            m.queue_ms = usage.queue_ms

    def _response(self, chunk: common_pb2.TokenChunk, final: bool) -> scheduler_pb2.GenerateResponse:
        response = scheduler_pb2.GenerateResponse(request_id=self.request.request_id, chunk=chunk)
        if final:
            m, now = self.measured, time.monotonic()
            response.usage.CopyFrom(
                common_pb2.Usage(
                    prompt_tokens=len(self.request.prompt_token_ids), completion_tokens=len(self.outputs),
                    cached_prompt_tokens=m.cached_tokens, queue_ms=m.queue_ms, prefill_ms=m.prefill_ms,
                    transfer_ms=m.transfer_ms, transfer_bytes=m.transfer_bytes, decode_ms=m.decode_ms,
                    ttft_ms=((m.first_token or now) - m.start) * 1000, e2e_ms=(now - m.start) * 1000,
                )
            )  # fmt: skip
            response.placement.CopyFrom(self.placement)
        return response


_releases: set[asyncio.Future[None]] = set()  # Release calls in flight, kept from the garbage collector


async def _release(worker: Worker, ticket_id: str) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        await worker.decode_stub().Release(decode_pb2.ReleaseRequest(ticket_id=ticket_id), timeout=5)


def common_plan(plan: Plan) -> scheduler_pb2.ExecutionPlan:
    return scheduler_pb2.EXECUTION_PLAN_LOCAL_PREFILL if plan.local else scheduler_pb2.EXECUTION_PLAN_DISAGGREGATED
