"""One request's way through the mesh, as the scheduler drives it: the hand-off state machine.

    place -> [reserve on the decode worker -> prefill into the ticket -> first token] -> decode stream

Reserve holds blocks under a lease and returns a ticket; Prefill pushes the prompt's KV into it
and answers with the first token once every layer has landed; Decode.Generate commits the ticket
and streams the rest. Before the commit, any failure releases the ticket (and its lease would free
it anyway). What a failure leads to is retry.classify's verdict: another prefill worker, the
decode worker prefilling itself, waiting for KV blocks, another decode worker continuing the
stream (prompt + output so far, same seed: the client sees one stream), or the end. Every call gets
what is left of the client's deadline; leaving this generator (client cancel) cancels them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import structlog
from opentelemetry import trace
from opentelemetry.trace import Span

from pdmesh.enums import FinishReason, WorkerRole
from services.scheduler import capacity, worker_client
from services.scheduler.errors import DownstreamFailed
from services.scheduler.placer import Placer
from services.scheduler.policy import Placement
from services.scheduler.registry import Worker
from services.scheduler.request import (
    Deadline,
    Finish,
    PlacementReport,
    Prefilled,
    Response,
    SchedulerRequest,
    TicketHandle,
    TokenChunk,
)
from services.scheduler.retry import Verdict, classify
from services.scheduler.usage import UsageMeter
from services.status import NoLiveWorker
from services.telemetry.spans import Attr, SpanName, tracer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class FlowSettings:
    lease_ms: int  # how long a decode worker holds an uncommitted ticket
    max_attempts: int  # prefill hand-offs, and decode failovers, per request
    queue_timeout_s: float  # how long a request may wait in all (a decode slot, then KV blocks)


class RequestFlow:
    def __init__(
        self,
        request: SchedulerRequest,
        placer: Placer,
        settings: FlowSettings,
        deadline: Deadline,
        releases: set[asyncio.Task[None]],  # the scheduler's Release calls in flight, outliving their flows
        queue_until: float,  # time.monotonic() when its queue budget runs out (the door's, shared with admission)
    ) -> None:
        self.request = request
        self.placer = placer
        self.registry = placer.registry
        self.settings = settings
        self.deadline = deadline
        self.releases = releases
        self.queue_until = queue_until
        self.shape = placer.shape(request)
        self.outputs: list[int] = []  # every token sent to the client
        self.meter = UsageMeter()
        self.report = PlacementReport()
        self.waiting = False  # for KV blocks (the scheduler's queue)
        self._ticket: tuple[Worker, TicketHandle] | None = None  # reserved and not yet committed
        self._held: list[Worker] = []
        self._schedule_span: Span | None = None  # pdmesh.schedule, open until the prompt is sent

    async def run(self) -> AsyncIterator[Response]:
        try:
            placement, first = await self._hand_off(self._place(exclude=()))
            if first is not None:
                ended = first.chunk.finish is not None  # at its first token: the ticket is not needed
                if ended:
                    await self._release_ticket()
                yield self._response(first.chunk, final=ended)
                if ended:
                    return
            async for response in self._stream(placement.decode):
                yield response
        finally:
            self._scheduled()
            self.placer.ended(self.request.request_id, len(self.outputs))
            await self._release_ticket()
            for worker in self._held:
                worker.assigned -= 1

    # -- placement and the hand-off ---------------------------------------------------------------

    def _place(self, exclude: tuple[Worker, ...]) -> Placement:
        with self._scheduling() as span:
            placement = self.placer.place(self.shape, exclude)
            if span.is_recording():
                self._describe(span, placement, exclude)
        self.report.plan = placement.plan
        self.report.decode_worker_id = placement.decode.worker_id
        self.report.prefill_worker_id = placement.prefill.worker_id if placement.prefill else ""
        log.debug("placed", plan=placement.plan.value, decode=self.report.decode_worker_id,
                  prefill=self.report.prefill_worker_id)  # fmt: skip
        return placement

    def _describe(self, span: Span, placement: Placement, exclude: tuple[Worker, ...]) -> None:
        live = [*self.registry.live(WorkerRole.PREFILL, exclude), *self.registry.live(WorkerRole.DECODE, exclude)]
        span.set_attributes({
            Attr.PLAN: placement.plan.value, Attr.DECODE_WORKER: placement.decode.worker_id,
            Attr.PREFILL_WORKER: placement.prefill.worker_id if placement.prefill else "",
            Attr.CANDIDATES: [w.worker_id for w in live],
            Attr.CACHED_TOKENS: self.shape.prompt_tokens - self.shape.uncached_tokens(placement.decode),
        })  # fmt: skip

    async def _hand_off(self, placement: Placement) -> tuple[Placement, Prefilled | None]:
        """Prefill on a prefill worker, placing again after each failure; None: the decode worker
        prefills the request itself."""
        for _ in range(self.settings.max_attempts):
            if placement.prefill is None:
                return placement, None
            try:
                return await self._prefill(placement)
            except DownstreamFailed as failure:
                placement = self._place(exclude=(self._worker_to_avoid(failure),))
        if placement.prefill is None:
            return placement, None
        raise NoLiveWorker("workers", "every placement attempt failed", "check the workers' logs")

    async def _prefill(self, placement: Placement) -> tuple[Placement, Prefilled]:
        """Reserve on a decode worker, then prefill + push; the ticket stays open on success."""
        with self._scheduling():
            placement, ticket = await capacity.reserve(
                self.registry, self.request, placement, self.settings.lease_ms, self.queue_until,
                self.deadline, self._waiting,
            )  # fmt: skip
        self._scheduled()
        self.report.decode_worker_id = placement.decode.worker_id
        self.placer.moved(self.request.request_id, placement.decode)
        assert placement.prefill is not None
        self._ticket = (placement.decode, ticket)
        try:
            prefilled = await worker_client.prefill(placement.prefill, self.request, ticket, self.deadline.left())
        except BaseException:
            await self._release_ticket()
            raise
        self.meter.prefilled(prefilled.usage)
        self.meter.token_sent()
        self.outputs += prefilled.chunk.token_ids
        return placement, prefilled

    def _worker_to_avoid(self, failure: DownstreamFailed) -> Worker:
        """The worker to place around after a failure its verdict allows to retry; else the end."""
        verdict = classify(failure.code, failure.phase)
        if self.deadline.passed or verdict not in (Verdict.ELSEWHERE, Verdict.BUSY):
            raise failure.client_error() from None
        log.warning("hand-off failed; placing again", worker=failure.worker.worker_id, reason=str(failure))
        if verdict is Verdict.ELSEWHERE:
            self.registry.mark_dead(failure.worker)
        return failure.worker

    # -- the decode stream ------------------------------------------------------------------------

    async def _stream(self, worker: Worker) -> AsyncIterator[Response]:
        ticket = self._ticket[1] if self._ticket is not None else None
        self._ticket = None  # Generate commits it: the decode worker owns it from here
        self._scheduled()  # a local prefill: the prompt goes to the decode worker now
        failovers = 0
        while True:
            self._hold(worker)
            try:
                async for response in self._decode(worker, ticket):
                    yield response
                return
            except DownstreamFailed as failure:
                verdict = classify(failure.code, failure.phase)
                if self.deadline.passed or verdict is Verdict.FAIL or failovers >= self.settings.max_attempts:
                    raise failure.client_error() from None
                ticket = None
                if verdict is Verdict.LOCAL:
                    log.warning("ticket lost before commit; prefilling on the decode worker", reason=failure.details)
                    continue
                failovers += 1
                self.report.num_decode_failovers = failovers
                log.warning("decode worker failed mid-stream; moving the request", worker=worker.worker_id,
                            reason=str(failure), tokens_so_far=len(self.outputs))  # fmt: skip
                self.registry.mark_dead(worker)
                worker = self.placer.replace_decode(self.shape, worker)
                self.report.decode_worker_id = worker.worker_id

    async def _decode(self, worker: Worker, ticket: TicketHandle | None) -> AsyncIterator[Response]:
        stream = worker_client.generate(worker, self.request, list(self.outputs), ticket, self.deadline.left())
        async with contextlib.aclosing(stream):
            async for decoded in stream:
                if decoded.chunk.token_ids:
                    self.meter.token_sent()
                self.outputs += decoded.chunk.token_ids
                if decoded.usage is not None:
                    # Without a ticket the worker prefilled the request itself: a local prefill, a
                    # ticket lost before its commit, or a failover (prompt and output so far).
                    self.meter.decoded(decoded.usage, prefilled_here=ticket is None)
                yield self._response(decoded.chunk, final=decoded.usage is not None)

    # -- bookkeeping ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _scheduling(self) -> Iterator[Span]:
        """Inside the request's pdmesh.schedule span (opened by the first placement, or again by a
        placement after a failed attempt), so the reservation's call is its child."""
        if self._schedule_span is None:
            self._schedule_span = tracer().start_span(SpanName.SCHEDULE.value)
        with trace.use_span(self._schedule_span, end_on_exit=False):
            yield self._schedule_span

    def _scheduled(self) -> None:
        """The prompt goes to the worker that computes it: scheduling is over."""
        if self._schedule_span is not None:
            self._schedule_span.end()
            self._schedule_span = None
            self.meter.prompt_sent()

    def _waiting(self, waiting: bool) -> None:
        self.waiting = waiting

    def _hold(self, worker: Worker) -> None:
        if worker not in self._held:
            worker.assigned += 1
            self._held.append(worker)

    async def _release_ticket(self) -> None:
        """Release the uncommitted ticket. The Release runs as a task of its own, so a cancellation
        arriving now (client gone, deadline passed) cannot cut it short; the lease is the backstop."""
        if self._ticket is not None:
            (worker, ticket), self._ticket = self._ticket, None
            task = asyncio.ensure_future(worker_client.release(worker, ticket.ticket_id))
            self.releases.add(task)
            task.add_done_callback(self.releases.discard)
            await asyncio.shield(task)

    def aborted(self) -> Response:
        """The last response of a stream the scheduler ended itself (its stop outlasted the grace)."""
        return self._response(TokenChunk((), finish=Finish(FinishReason.ABORT)), final=True)

    def _response(self, chunk: TokenChunk, final: bool) -> Response:
        if chunk.token_ids:
            self.placer.prefilled(self.request.request_id)  # once: the ledger ignores the repeats
        if not final:
            return Response(self.request.request_id, chunk)
        usage = self.meter.usage(self.request.num_prompt_tokens, len(self.outputs))
        return Response(self.request.request_id, chunk, usage, dataclasses.replace(self.report))
