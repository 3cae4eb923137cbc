"""Simulated prefill and decode workers: the engine's batching, with step times from a profile.

Each follows the engine's batcher (engine/batcher.py) closely enough for placement to matter as
it does on real workers: a per-step token budget spent on decode rows first (one token each), then
on prompt chunks in priority order, then arrival order; prefix-cache hits at admission (whole
blocks, never the last token); a decode worker's prompt chunks riding its decode steps, so a
local prefill slows every request in the batch. A step's work is what the profile's step model
says for its shape, times a drawn noise, plus the engine's own time between steps (the profile's
step gap); it runs on the mesh's cores (pdmesh.sim.cores: a device each, or a CPU host's cores
shared); the worker records it (engine.step_samples) and reports it with its load, as a real
worker does.

Simplifications, each stated where it lives: KV grows by a request's whole output when it joins a
decode batch (no preemption: a full worker takes no more, as the reservation watermark intends);
a prefill worker's KV limit is not modelled (its budget bounds what it holds); nothing fails.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.kv_layout import KVLayout
from engine.step_samples import StepRecorder, StepShape
from pdmesh.enums import WorkerHealth, WorkerRole
from pdmesh.sim.cache import PrefixCache
from pdmesh.sim.clock import EventLoop
from pdmesh.sim.cores import Cores
from pdmesh.sim.workload import SimRequest
from services.scheduler.profile import Profile, RoleProfile
from services.scheduler.reports import Capacity, LoadReport, WorkerInfo

SAMPLES_PER_REPORT = 64  # as services/worker/server.py


@dataclass(slots=True, eq=False)
class Job:
    """One request inside the simulation."""

    request: SimRequest
    block_tokens: int
    admitted: bool = False  # by the engine computing its prompt
    cached: int = 0  # prompt tokens reused from that engine's prefix cache
    computed: int = 0  # prompt tokens computed beyond them
    reserved: bool = False  # KV held on its decode worker for a hand-off
    decode_id: str = ""  # its decode worker
    first_token_s: float | None = None
    finished_s: float | None = None
    order: tuple[int, int] = field(default=(0, 0))  # (-priority, index): the batcher's order

    @property
    def prompt(self) -> int:
        return self.request.prompt_tokens

    @property
    def left(self) -> int:
        return self.prompt - self.cached - self.computed

    def reusable_blocks(self) -> tuple[int, ...]:
        return self.request.blocks[: (self.prompt - 1) // self.block_tokens]

    def full_blocks(self) -> tuple[int, ...]:
        return self.request.blocks[: self.prompt // self.block_tokens]


class SimWorker:
    role: WorkerRole

    def __init__(
        self, loop: EventLoop, worker_id: str, profile: Profile, role: RoleProfile, block_tokens: int, seed: int,
        cores: Cores,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.cores = cores
        self.worker_id = worker_id
        self.profile = profile
        self.limits = role
        self.block_tokens = block_tokens
        self.cache = PrefixCache(role.kv_capacity_tokens // block_tokens)
        self.steps = StepRecorder()
        self.stepping = False
        self.report_seq = 0
        self._rng = random.Random(seed)
        self.device_id = ""  # the simulated GPU it shares with others ("": a device of its own)

    def info(self, layout: KVLayout) -> WorkerInfo:
        capacity = Capacity(
            self.limits.kv_capacity_tokens // self.block_tokens, self.limits.max_running,
            self.limits.max_batched_tokens, 1 << 30,
        )  # fmt: skip
        return WorkerInfo(
            self.worker_id, self.role, f"sim://{self.worker_id}", "", "sim", layout, capacity, "sim",
            device_id=self.device_id,
        )  # fmt: skip

    def report(self, snapshot: bool) -> LoadReport:
        self.report_seq += 1
        free, total, running, waiting, reservations = self.counts()
        return LoadReport(
            self.worker_id, self.report_seq, int(self.loop.now() * 1000), WorkerHealth.SERVING, free, total,
            running, waiting, reservations, kv_events=self.cache.take_events(snapshot),
            step_samples=tuple(self.steps.take(SAMPLES_PER_REPORT)), transfer_samples=self.take_pushes(),
        )  # fmt: skip

    def counts(self) -> tuple[int, int, int, int, int]:
        """KV blocks free and in all, requests running and waiting, reservations held."""
        raise NotImplementedError

    def take_pushes(self) -> tuple[tuple[int, float], ...]:
        return ()

    def _admit(self, job: Job) -> None:
        """First scheduled here: the prompt's cached prefix is reused, never its last token."""
        job.admitted = True
        job.cached = min(self.cache.match(job.reusable_blocks()) * self.block_tokens, job.prompt - 1)

    def _run_step(self, shape: StepShape, then: Callable[[], None]) -> None:
        """The step's work (the profile's model, times a drawn noise) and the engine's own time
        before its next step (the profile's step gap), on the mesh's cores. The engine times its
        step alone, so that share of the wall time is what the worker reports."""
        work_ms = self.profile.step.step_ms(shape) * self._noise()
        total_ms = work_ms + self.profile.step_gap_ms
        self.stepping = True

        def end(wall_ms: float) -> None:
            self.stepping = False
            self.steps.record(shape, wall_ms * work_ms / total_ms if total_ms > 0 else 0.0)
            then()

        self.cores.run(total_ms, end)

    def _noise(self) -> float:
        """A step's time relative to the model's: the profile's relative noise, drawn."""
        sigma = self.profile.step_noise
        if sigma <= 0:
            return 1.0
        # Log-normal with mean 1 and that relative deviation: a step is never negative, and a
        # large deviation is a few steps taken far longer (preempted on a shared CPU), not many
        # short ones. A normal clipped at a floor drifts the mean up as the deviation grows (by a
        # third at the 1.6 a busy CPU mesh reported).
        log_sigma = math.sqrt(math.log1p(sigma * sigma))
        return self._rng.lognormvariate(-log_sigma * log_sigma / 2, log_sigma)

    def push_ms(self, num_bytes: int) -> float:
        """A KV push's exposed time, drawn as a step's."""
        return self.profile.transfer.transfer_ms(num_bytes) * self._noise()


class SimPrefill(SimWorker):
    """Computes prompts, in chunks of its budget, highest priority first."""

    role = WorkerRole.PREFILL

    def __init__(
        self, loop: EventLoop, worker_id: str, profile: Profile, role: RoleProfile, block_tokens: int, seed: int,
        cores: Cores, on_prefilled: Callable[[Job, SimPrefill], None],
    ) -> None:  # fmt: skip
        super().__init__(loop, worker_id, profile, role, block_tokens, seed, cores)
        self.queue: list[Job] = []
        self.on_prefilled = on_prefilled
        self.pushes: list[tuple[int, float]] = []

    def submit(self, job: Job) -> None:
        bisect.insort(self.queue, job, key=lambda j: j.order)
        if not self.stepping:
            self._step()

    def counts(self) -> tuple[int, int, int, int, int]:
        running = sum(j.admitted for j in self.queue)
        return self.cache.capacity, self.cache.capacity, running, len(self.queue) - running, 0

    def take_pushes(self) -> tuple[tuple[int, float], ...]:
        pushes, self.pushes = self.pushes[-SAMPLES_PER_REPORT:], []
        return tuple(pushes)

    def _step(self) -> None:
        budget = self.limits.max_batched_tokens
        chunks: list[tuple[Job, int]] = []
        tokens = pairs = 0
        for job in self.queue:
            if budget <= 0:
                break
            if not job.admitted:
                self._admit(job)
            n = min(job.left, budget)
            chunks.append((job, n))
            tokens += n
            pairs += StepShape.attention_pairs(n, job.cached + job.computed)
            budget -= n
        if chunks:
            self._run_step(StepShape(tokens, pairs), lambda: self._end(chunks))

    def _end(self, chunks: list[tuple[Job, int]]) -> None:
        for job, n in chunks:
            job.computed += n
            if job.left == 0:
                self.queue.remove(job)
                self.cache.insert(job.full_blocks())
                self.on_prefilled(job, self)
        if self.queue:
            self._step()


class SimDecode(SimWorker):
    """Generates tokens for its batch; prompts it prefills itself ride the same steps."""

    role = WorkerRole.DECODE

    def __init__(
        self, loop: EventLoop, worker_id: str, profile: Profile, role: RoleProfile, block_tokens: int, seed: int,
        cores: Cores, on_first_token: Callable[[Job], None], on_finished: Callable[[Job], None],
    ) -> None:  # fmt: skip
        super().__init__(loop, worker_id, profile, role, block_tokens, seed, cores)
        self.on_first_token = on_first_token
        self.on_finished = on_finished
        self.capacity = self.limits.kv_capacity_tokens
        self.kv_used = 0
        self.local: list[Job] = []  # prompts to compute here, in the batcher's order
        self.joining: deque[Job] = deque()  # KV landed, joining at the next step
        self.batch: list[tuple[int, int, Job]] = []  # (finishing step, index, job): the decode rows
        self.context = 0  # tokens the decode rows attend, summed
        self.step_index = 0
        self.reservations = 0

    def reserve(self, job: Job) -> bool:
        """Decode.Reserve: KV for the prompt, leaving the watermark free while anything is held."""
        keep = int(self.capacity * 0.1) if self.kv_used else 0
        if job.prompt > self.capacity - self.kv_used - keep:
            return False
        self.kv_used += job.prompt
        job.reserved = True
        self.reservations += 1
        return True

    def join(self, job: Job) -> None:
        """Decode.Generate committing its ticket: it joins the batch at the next step."""
        self.reservations -= 1
        self.joining.append(job)
        self.cache.insert(job.full_blocks())
        if not self.stepping:
            self._step()

    def submit_local(self, job: Job) -> None:
        bisect.insort(self.local, job, key=lambda j: j.order)
        if not self.stepping:
            self._step()

    def counts(self) -> tuple[int, int, int, int, int]:
        admitted = sum(j.admitted for j in self.local)
        free = max(0, self.capacity - self.kv_used) // self.block_tokens
        waiting = len(self.local) - admitted + len(self.joining)
        return free, self.capacity // self.block_tokens, len(self.batch) + admitted, waiting, self.reservations

    def _step(self) -> None:
        while self.joining and len(self.batch) < self.limits.max_running:
            self._start_decoding(self.joining.popleft())
        rows = len(self.batch)
        budget = self.limits.max_batched_tokens - rows
        chunks: list[tuple[Job, int]] = []
        tokens = pairs = 0
        for job in self.local:
            if budget <= 0:
                break
            if not job.admitted:
                if job.prompt > self.capacity - self.kv_used:
                    break  # the engine waits for blocks; later prompts wait behind it
                self._admit(job)
                self.kv_used += job.prompt
            n = min(job.left, budget)
            chunks.append((job, n))
            tokens += n
            pairs += StepShape.attention_pairs(n, job.cached + job.computed)
            budget -= n
        if rows or chunks:
            self._run_step(StepShape(tokens, pairs, rows, self.context), lambda: self._end(rows, chunks))

    def _end(self, rows: int, chunks: list[tuple[Job, int]]) -> None:
        self.step_index += 1
        self.context += rows  # every row attended one more token and wrote it
        while self.batch and self.batch[0][0] <= self.step_index:
            job = heapq.heappop(self.batch)[2]
            self._finish(job)
        for job, n in chunks:
            job.computed += n
            if job.left == 0:
                self.local.remove(job)
                self.cache.insert(job.full_blocks())
                self.on_first_token(job)
                self._start_decoding(job)
        if self.batch or self.local or self.joining:
            self._step()

    def _start_decoding(self, job: Job) -> None:
        """Its first token is out: the rest are decode rows, one a step."""
        self.kv_used += job.request.output_tokens
        rest = job.request.output_tokens - 1
        if rest <= 0:
            self._finish(job, started=False)
            return
        self.context += job.prompt + 1
        heapq.heappush(self.batch, (self.step_index + rest, job.request.index, job))

    def _finish(self, job: Job, started: bool = True) -> None:
        if started:
            self.context -= job.prompt + job.request.output_tokens
        self.kv_used -= job.prompt + job.request.output_tokens
        self.on_finished(job)

