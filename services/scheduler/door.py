"""Where a client's request enters the scheduler's core: the one path both doors take.

The gRPC servicer (servicer.py) and the OpenAI HTTP routes (openai_api/) each read their wire
into a ClientRequest, then await `Door.accept` (the served model, intake's checks on a thread,
whether any decode worker could ever hold it) and iterate `Door.generate` (admission: the decode
slots and the bounded queue; then one RequestFlow: placement, the hand-off, the stream, failover,
as one of the streams a stop can end with an ABORT chunk). Leaving the iteration early cancels
the request in the mesh and frees what it held. Anything that must see every request (spans,
metrics, admission) lives here, not in the doors: each door opens a RequestWatch with
`Door.watch` (its root span, from the trace context its wire carried) around both calls, and
the Door reports to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from engine.sampling_params import check_context
from engine.tokenizer import Tokenizer
from pdmesh.config import SchedulerConfig
from pdmesh.enums import WorkerRole
from services.scheduler import intake
from services.scheduler.admission import Admission
from services.scheduler.flow import FlowSettings, RequestFlow
from services.scheduler.intake import ClientRequest
from services.scheduler.placer import Placer
from services.scheduler.request import Deadline, Response, SchedulerRequest
from services.scheduler.streams import Streams
from services.scheduler.telemetry import RequestWatch, SchedulerMetrics
from services.status import ExceedsCapacity, ModelNotFound


@dataclass(frozen=True)
class Readiness:
    """Who could serve a request now."""

    num_prefill: int  # live prefill workers
    num_decode: int  # live decode workers; each can also prefill a request itself

    @property
    def ready(self) -> bool:
        # A decode worker alone serves (it prefills locally when no prefill worker is live), so
        # a live decode worker is what a request needs: it is both prefill-capable and decode.
        return self.num_decode > 0


class Door:
    def __init__(self, config: SchedulerConfig, tokenizer: Tokenizer, placer: Placer) -> None:
        self.model = config.model
        self.max_prompt_bytes = config.max_prompt_bytes
        self.tokenizer = tokenizer
        self.placer = placer  # the policy, the registry it reads and the ledger of placements
        self.registry = placer.registry
        self.settings = FlowSettings(config.lease_ms, config.max_attempts, config.queue_timeout_ms / 1000)
        self.flows: set[RequestFlow] = set()  # requests admitted into the mesh, either door
        self.releases: set[asyncio.Task[None]] = set()  # tickets being released for flows that ended
        self.streams = Streams()  # what a stop outlasting its grace ends with an ABORT chunk
        self.admission = Admission(self._decode_slots, config.max_queued_requests)
        self.metrics = SchedulerMetrics(config.model, lambda: self.num_running, lambda: self.num_queued)

    def watch(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> RequestWatch:
        """`with door.watch(...) as watch:` around one request's accept and generate; `metadata`
        is the call's gRPC metadata or HTTP headers (a W3C traceparent in it parents the span)."""
        return RequestWatch(self.metrics, metadata)

    async def accept(self, request: ClientRequest, watch: RequestWatch) -> SchedulerRequest:
        """The request as the core works on it, or a typed error saying why not."""
        if request.model and request.model != self.model:
            raise ModelNotFound(
                "model", f"{request.model!r} is not served here", f"use {self.model!r} or leave it empty"
            )
        # Tokenizing is CPU work of any length: off the event loop, so no stream stalls on it.
        received_at = self.registry.clock()  # its TTFT target runs from here
        accepted = await asyncio.to_thread(intake.accept, request, self.tokenizer, self.max_prompt_bytes)
        accepted = dataclasses.replace(accepted, received_at=received_at)
        if request.max_tokens_unset:
            accepted = self._fill_context(accepted)
        watch.accepted(accepted, chat=isinstance(request.prompt, intake.ChatPrompt))
        self._check_fits(accepted)
        return accepted

    async def generate(
        self, request: SchedulerRequest, deadline: Deadline, watch: RequestWatch
    ) -> AsyncIterator[Response]:
        """The request's responses, the last with usage and placement; a typed error ends it."""
        # One queue budget for all its waiting: a decode slot here, KV blocks after placement.
        queue_until = time.monotonic() + self._queue_timeout_s(request)
        flow = RequestFlow(request, self.placer, self.settings, deadline, self.releases, queue_until)
        may_wait = functools.partial(self.placer.wait_budget_s, flow.shape)
        async with self.admission.admit(request.priority, queue_until, may_wait):
            self.flows.add(flow)
            try:
                async for response in self.streams.run(flow):
                    watch.sent(response)
                    yield response
            finally:
                self.flows.discard(flow)

    @property
    def num_queued(self) -> int:
        """Requests queued for a decode slot, and admitted ones waiting for KV blocks."""
        return self.admission.queued + sum(f.waiting for f in self.flows)

    @property
    def num_running(self) -> int:
        return len(self.flows) - sum(f.waiting for f in self.flows)

    def readiness(self) -> Readiness:
        return Readiness(len(self.registry.live(WorkerRole.PREFILL)), len(self.registry.live(WorkerRole.DECODE)))

    def _decode_slots(self) -> int | None:
        """Batch slots of the live decode workers; None (no limit) when one states none or none
        is live (placement then answers at once)."""
        slots = [w.info.capacity.max_num_running_requests for w in self.registry.live(WorkerRole.DECODE)]
        return sum(slots) if slots and all(slots) else None

    def _queue_timeout_s(self, request: SchedulerRequest) -> float:
        timeout_s = self.settings.queue_timeout_s
        ttft_ms = request.slo.ttft_ms or self.placer.slo.default_ttft_ms  # the target placement holds it to
        return min(timeout_s, ttft_ms / 1000) if ttft_ms > 0 else timeout_s

    def _fill_context(self, request: SchedulerRequest) -> SchedulerRequest:
        """max_tokens up to what the prompt leaves of the context window and of the largest decode
        cache; the default when no worker has said how large those are."""
        capacities = [w.info.kv_capacity_tokens for w in self.registry.live(WorkerRole.DECODE)]
        limits = [max(capacities)] if capacities else []
        if self.registry.max_model_len is not None:
            limits.append(self.registry.max_model_len)
        if not limits:
            return request
        room = max(1, min(limits) - request.num_prompt_tokens)  # a prompt that fits nowhere is refused next
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=room))

    def _check_fits(self, request: SchedulerRequest) -> None:
        """Refuse at once what no decode worker could ever hold, instead of queueing it forever."""
        if self.registry.max_model_len is not None:
            check_context(request.num_prompt_tokens, request.sampling.max_tokens, self.registry.max_model_len)
        num_tokens = request.num_prompt_tokens + request.sampling.max_tokens
        capacities = [w.info.kv_capacity_tokens for w in self.registry.live(WorkerRole.DECODE)]
        if capacities and num_tokens > max(capacities):
            largest = max(capacities)
            # Blame the prompt only when it alone does not fit; else max_tokens asks too much.
            field, fix = (
                ("prompt", "shorten the prompt")
                if request.num_prompt_tokens >= largest
                else ("max_tokens", f"ask for at most {largest - request.num_prompt_tokens} tokens")
            )
            raise ExceedsCapacity(
                field, f"the request needs KV for {num_tokens} tokens and the largest decode worker holds {largest}",
                f"{fix}, or add decode memory",
            )  # fmt: skip
