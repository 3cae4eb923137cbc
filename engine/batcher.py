"""The batcher: each step, which requests advance and by how many tokens.

Design note (continuous batching with chunked prefill). Every request just needs its computed
count to catch up with its tokens. Each step spends a token budget: running requests first, in
priority order (then arrival order) — a decoding request costs one token, a request in the middle
of its prompt costs its next chunk — then waiting requests are admitted, again by priority, while
budget, batch slots and blocks last; the prompt chunks of running requests less important than a
waiting one come after its admission. So a low-priority prompt never takes the budget a
higher-priority one needs for its first token. A prefix-cache hit or a landed KV import makes the
computed count jump at admission, so those tokens cost nothing. When a running request cannot get
a block, the lowest-priority, most recently admitted running request is preempted: its blocks go
back to the pool and it waits to be recomputed from scratch (prompt plus the output so far), which
the prefix cache usually makes cheap.

The batcher decides; it does not run the model, sample or free on finish (the engine does).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.config import BatcherConfig
from engine.kv_manager import KVManager
from engine.request import Request, RequestStatus
from engine.step_samples import StepShape


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """After this chunk every token has KV, so the step samples the next one."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class Batch:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed_imports: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Batcher:
    def __init__(self, config: BatcherConfig, kv: KVManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.insert(_position(self.waiting, request, first_of_priority=False), request)

    def remove(self, request: Request) -> None:
        """Forget a request (finished or aborted); the engine releases its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> Batch:
        """Decode rows, and the prompt chunks of running requests at least as important as the
        most important waiting one, first; then waiting requests are admitted; then the other
        running prompts take what budget is left. Without waiting requests: running in order."""
        batch = Batch()
        budget = self.config.max_batched_tokens
        top = self.waiting[0].priority if self.waiting else None
        scheduled: set[int] = set()

        def first(r: Request) -> bool:
            return top is None or r.priority >= top or r.num_uncomputed_tokens == 1

        budget = self._schedule_running(batch, budget, first, scheduled)
        if batch.preempted:
            return batch
        budget = self._admit_waiting(batch, budget, scheduled)
        if len(scheduled) < len(self.running):  # running prompts left out of the first pass
            self._schedule_running(batch, budget, lambda r: True, scheduled)
        return batch

    def _chunk_size(self, request: Request, budget: int) -> int:
        return min(request.num_uncomputed_tokens, budget, self.config.max_prefill_chunk)

    def _schedule_running(
        self, batch: Batch, budget: int, eligible: Callable[[Request], bool], scheduled: set[int]
    ) -> int:
        i = 0
        chunks, max_chunk = batch.chunks, self.config.max_prefill_chunk
        while i < len(self.running) and budget > 0:  # per row at batch 64: kept lean (host time a step)
            request = self.running[i]
            i += 1
            if id(request) in scheduled or not eligible(request):
                continue
            n = min(len(request.token_ids) - request.num_computed_tokens, budget, max_chunk)
            while not self.kv.try_grow(request, n):
                victim = next((r for r in reversed(self.running) if id(r) not in scheduled), None)
                if victim is None:  # everything else already has its chunk in this step
                    return budget
                self._preempt(victim, batch)
                if victim is request:
                    return budget
                i = min(i, len(self.running))
            chunks.append(ScheduledChunk(request, n))
            scheduled.add(id(request))
            budget -= n
        return budget

    def _preempt(self, request: Request, batch: Batch) -> None:
        self.running.remove(request)
        self.kv.release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.insert(_position(self.waiting, request, first_of_priority=True), request)
        batch.preempted.append(request)

    def _admit_waiting(self, batch: Batch, budget: int, scheduled: set[int]) -> int:
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            request = self.waiting.popleft()
            if request.status is RequestStatus.WAITING_FOR_KV and not self._import_landed(request, batch):
                if request.kv_import is not None:  # still in flight: let others pass
                    skipped.append(request)
                continue
            fresh = not request.block_ids and request.num_computed_tokens == 0
            if fresh:
                cached = self.kv.take_cached_prefix(request)
                if request.num_preemptions == 0:  # what the request reports is its first admission's
                    request.num_cached_tokens = cached
            n = self._chunk_size(request, budget)
            if not self.kv.can_grow(request, n):
                if fresh:  # its cached prefix is not held while it waits: waiting requests holding
                    # cached blocks could leave none for any of them, with nothing running to free any
                    self.kv.release(request)
                    request.num_computed_tokens = 0
                self.waiting.appendleft(request)
                break
            self.kv.grow(request, n)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.insert(_position(self.running, request, first_of_priority=False), request)
            batch.chunks.append(ScheduledChunk(request, n))
            scheduled.add(id(request))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _import_landed(self, request: Request, batch: Batch) -> bool:
        """Whether a WAITING_FOR_KV request may run now. A failed import goes to batch.failed_imports,
        unless it was optional (a prefix from a KV store): then the request computes those tokens."""
        kv_import = request.kv_import
        assert kv_import is not None
        if kv_import.error() is not None:
            request.kv_import = None
            if not request.import_optional:
                batch.failed_imports.append(request)
                return False
            self._forget_import(request)
            return True
        if not kv_import.done():
            return False
        request.kv_import = None
        # An ordinary waiting request from now on: if it cannot grow yet it goes back to the queue,
        # and the next step must not look for an import it no longer has.
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = request.num_cached_tokens + request.num_imported_tokens
        return True

    def _forget_import(self, request: Request) -> None:
        """A failed optional import: nothing writes its blocks any more. They all go back, and the
        request is admitted as a fresh one (its own cached prefix taken again, the rest computed),
        so that if it cannot run yet it does not wait holding blocks it no longer uses."""
        self.kv.release(request)
        request.num_imported_tokens = request.num_cached_tokens = request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING


def _position(queue: Sequence[Request], request: Request, first_of_priority: bool) -> int:
    """Where `request` goes in a queue kept in priority order (higher first): after every request
    of its priority (arrival order), or before them (a preempted request, which was admitted first)."""
    for i, other in enumerate(queue):
        if other.priority < request.priority or (first_of_priority and other.priority == request.priority):
            return i
    return len(queue)


def step_shape(batch: Batch) -> StepShape:
    """The step's work as the scheduler's step-time model sees it (before the step runs). A decode
    row is a one-token chunk of a request that has output; everything else is prompt work."""
    return StepShape.of_chunks(
        (c.num_new_tokens, c.request.num_computed_tokens, c.num_new_tokens == 1 and c.request.num_output_tokens > 0)
        for c in batch.chunks
    )
