"""Predictions of one plan for one request: its TTFT, its TPOT, what it costs, and what admitting it
does to the requests already on its decode worker.

Two plans exist for a request (pdmesh.enums.ExecutionPlan):
- DISAGGREGATED on (p, d): TTFT = p's queue ahead of it + its prefill on p + the exposed KV push
  + overhead; cost = p's compute + the push. It joins d's batch at its first token.
- LOCAL_PREFILL on d: TTFT = d's local prefill queue + its prefill as chunks riding d's decode
  steps + overhead; cost = the time those steps gain (the prompt's compute), which every request
  running on d waits for as well.
Either way d's batch grows by one: the predicted step time after admission must stay within the
new request's TPOT target and every member's own, and a local prefill's stall must fit in each
member's remaining TPOT budget (its remaining tokens times its target less the new step time),
so admitting a request never pushes a running one past its SLO. d must also hold its KV (with the
reservation watermark left free) and have a batch slot.

All times in milliseconds from now; workers' models come from their calibrated predictors. The
models predict means; every check against a target uses an upper bound instead (the forecast times
the worker's recent error margin, margin.Margins): a TTFT bound per plan (the policy's), the step
time after admission as `step_bound_ms` here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from engine.step_samples import StepShape
from services.scheduler.ledger import Booking, DecodeBatch, Ledger
from services.scheduler.margin import Outcome
from services.scheduler.predictor import prefill_steps
from services.scheduler.registry import Worker

DEFAULT_BUDGET_TOKENS = 2048  # a worker that registered no step budget
_TIE_MS = 1e-6


class Check(Enum):
    """What a plan must pass to be feasible; an infeasible plan names the first it failed (the
    refusal says which), in the order checked."""

    ROOM = "its decode worker can never hold the request's KV"
    FULL = "its decode worker has no room for the request (KV, a batch slot) before the TTFT target"
    TTFT = "its TTFT bound exceeds the target"
    TPOT = "the decode step after admission (its bound) exceeds the request's TPOT target"
    MEMBERS = "the decode step after admission (its bound) exceeds a running request's TPOT target"
    STALL = "the prefill's stall would push running requests past their TPOT targets"


@dataclass(frozen=True, slots=True)
class Request:
    """What a forecast needs of a request."""

    prompt_tokens: int
    max_tokens: int
    priority: int  # Priority.rank
    ttft_ms: float  # targets; 0: none. TTFT: what is left of it now (the time since it arrived taken off)
    tpot_ms: float

    @property
    def mean_context(self) -> int:
        return self.prompt_tokens + self.max_tokens // 2

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class Prefill:
    """The prompt side of a plan on one worker (a prefill worker, or a decode worker locally)."""

    worker: Worker
    cached_tokens: int
    wait_ms: float  # its queue ahead of the request
    duration_ms: float  # its prompt's steps, first to last
    compute_ms: float  # what those steps cost beyond what the worker was doing anyway: the plan's cost
    steps: int  # engine steps the prompt takes
    transfer_ms: float  # exposed push (0 locally)
    calibrated: bool  # its duration is evidence enough to refuse on (WorkerPredictors.calibrated)
    device_work_ms: float = 0.0  # all prompt work queued on its device (any worker's, any priority): it
    # stalls the decode batches there anyway
    pace: float = 1.0  # its duration against the same steps on a device of its own (DeviceLoad.prompt_ms)
    delay_ms: float = 0.0  # what it costs the first tokens of prompts queued on its device's other workers

    @property
    def ready_ms(self) -> float:
        """From now to its first token (without the fixed overhead)."""
        return self.wait_ms + self.duration_ms + self.transfer_ms


@dataclass(frozen=True, slots=True)
class Neighbour:
    """Another worker on a worker's device, as a GPU context beside it: how long it keeps the
    device busy, and where its queued prompts end (in work from now, its own order)."""

    busy_ms: float  # its queued prompt work; inf while it holds a decode batch (it steps on and on)
    ends_ms: tuple[float, ...]  # each queued prompt's end, cumulative work from now
    queued_ms: float  # all its queued prompt work, whatever the priority


@dataclass(frozen=True, slots=True)
class DeviceLoad:
    """What the other workers on a worker's device (Registry.sharing) put on it, as its forecasts
    count it. A GPU time-slices the processes on it: each context busy at a time gets an equal share
    (processor sharing), so a prompt does not wait for a neighbour's queue, it runs beside it."""

    neighbours: tuple[Neighbour, ...] = ()
    own_busy: bool = False  # the worker forecast holds a decode batch: its context is on the device anyway

    @property
    def decoding(self) -> int:
        return sum(1 for n in self.neighbours if math.isinf(n.busy_ms))

    @property
    def pace(self) -> float:
        """How much longer a decode step takes here than alone: the device shared equally with each
        neighbour's decode batch, which steps as long as it lasts."""
        return 1.0 + self.decoding

    @property
    def queued_all_ms(self) -> float:
        """The neighbours' queued prompt work: it stalls the decode batches on the device anyway."""
        return sum(n.queued_ms for n in self.neighbours)

    def finish_ms(self, work_ms: float) -> float:
        """When `work_ms` of the worker's own work (alone-pace) is done: while a neighbour is busy
        each gets half (with k busy, 1/(k+1)); a neighbour busy for b ms of its own work delays it
        by min(b, work)."""
        return work_ms + sum(min(n.busy_ms, work_ms) for n in self.neighbours)

    def prompt_ms(self, own_wait_ms: float, work_ms: float) -> tuple[float, float]:
        """A prompt after `own_wait_ms` of the worker's own queue: (its start, its duration)."""
        start = self.finish_ms(own_wait_ms)
        return start, self.finish_ms(own_wait_ms + work_ms) - start

    def delay_ms(self, own_wait_ms: float, work_ms: float) -> float:
        """What the prompt costs the neighbours' queued prompts' first tokens, summed: each one still
        running while it runs ends later by the overlap. None when the worker holds a decode batch:
        its context shares the device anyway, the prompt rides its steps and takes no one's share."""
        if self.own_busy or not self.neighbours:
            return 0.0
        return sum(min(work_ms, max(0.0, end - own_wait_ms)) for n in self.neighbours for end in n.ends_ms)


NO_SHARING = DeviceLoad()


def device_load(worker: Worker, others: Sequence[Worker], ledger: Ledger, now: float) -> DeviceLoad:
    """The load of `others` (the workers sharing a device with `worker`) on that device. A worker
    with batch members (decoding, or their prompts on the way) counts as stepping on: by the time a
    prompt placed now runs, they decode."""
    if not others:
        return NO_SHARING
    return DeviceLoad(tuple(_neighbour(w, ledger, now) for w in others), _holds_batch(worker, ledger))


def _holds_batch(worker: Worker, ledger: Ledger) -> bool:
    return any(True for _ in ledger.members(worker.worker_id))


def _neighbour(worker: Worker, ledger: Ledger, now: float) -> Neighbour:
    queue = ledger.queue(worker.worker_id)
    queued = queue.wait_ms(now)
    drained = max(0.0, sum(queue.work_ms) - queued)  # the work done since the queue's epoch
    ends, total = [], 0.0
    for booking in queue.pending.values():
        total += booking.prefill_ms
        if total > drained:
            ends.append(total - drained)
    busy = math.inf if _holds_batch(worker, ledger) else queued
    return Neighbour(busy, tuple(ends), queued)


@dataclass(frozen=True, slots=True)
class DecodeSide:
    """A decode worker's batch, now and with the request added."""

    worker: Worker
    batch: DecodeBatch
    step_now_ms: float
    step_after_ms: float
    step_bound_ms: float  # the step after admission, bounded by the worker's recent TPOT errors
    room_wait_ms: float  # until its KV and a batch slot are free for the request (inf: never)
    local_wait_ms: float  # its own prefill queue (local prefills placed on it) ahead of the request
    local_work_ms: float  # all of that queue, whatever its priority: what will stall its batch anyway
    calibrated: bool  # the step after admission is evidence enough to refuse on (WorkerPredictors.calibrated)
    device: DeviceLoad  # what the workers sharing its device put on it (NO_SHARING: none)
    tpot_floor_ms: float = 0.0  # no step is bounded below this (margin.MarginSettings)

    @property
    def fits(self) -> bool:
        """It can ever hold the request (a full worker makes the request wait: room_wait_ms)."""
        return not math.isinf(self.room_wait_ms)

    def tpot_ok(self, request: Request, stall_ms: float = 0.0) -> bool:
        return self.tpot_failure(request, stall_ms) is None

    def tpot_failure(self, request: Request, stall_ms: float = 0.0) -> Check | None:
        """Whether the step after admission (its bound) meets the new request's target (with
        `stall_ms` more spread over its tokens), then every member's: the check it fails, if any.
        An uncalibrated forecast fails nothing (a guess is no reason to refuse) but a target under
        the floor, which no bound is ever below."""
        if not self.calibrated:
            return Check.TPOT if 0 < request.tpot_ms < self.tpot_floor_ms else None
        step = self.step_bound_ms - _TIE_MS  # a forecast equal to the target meets it, whatever the rounding
        if request.tpot_ms > 0 and step + stall_ms / max(1, request.max_tokens - 1) > request.tpot_ms:
            return Check.TPOT
        tightest = self.batch.min_tpot_ms
        return Check.MEMBERS if tightest > 0 and step > tightest else None


def prefill_on(
    worker: Worker, ledger: Ledger, request: Request, cached: int, now: float, device: DeviceLoad = NO_SHARING
) -> Prefill:
    """The request's prompt computed on a prefill worker, then pushed; on a shared device after its
    own queue, both sharing the device with the neighbours' work (DeviceLoad.prompt_ms)."""
    model = worker.predictors.step
    budget = worker.info.capacity.max_num_batched_tokens or DEFAULT_BUDGET_TOKENS
    uncached = max(1, request.prompt_tokens - cached)
    shape, steps = prefill_steps(uncached, request.prompt_tokens - uncached, budget)
    compute = model.step_ms(shape, steps)
    push = worker.predictors.transfer.transfer_ms(request.prompt_tokens * worker.info.kv_layout.bytes_per_token)
    queue = ledger.queue(worker.worker_id)
    own_wait = queue.wait_ms(now, request.priority)
    start, duration = device.prompt_ms(own_wait, compute)
    return Prefill(
        worker, cached, start, duration, compute, steps, push, worker.predictors.calibrated_for(shape),
        queue.wait_ms(now) + device.queued_all_ms, duration / compute if compute > 0 else 1.0,
        device.delay_ms(own_wait, compute),
    )  # fmt: skip


def decode_side(
    worker: Worker, ledger: Ledger, request: Request, now: float, headroom: float, device: DeviceLoad = NO_SHARING
) -> DecodeSide:
    """Its batch now and after admission; on a shared device its steps at the device's pace."""
    model = worker.predictors.step
    batch = ledger.batch(worker.worker_id)
    n, context = len(batch), batch.context_tokens
    step_now = model.decode_step_ms(n, context) * device.pace
    after = StepShape(0, 0, n + 1, context + request.mean_context)
    step_after = model.step_ms(after) * device.pace
    error = worker.predictors.relative_error
    return DecodeSide(
        worker, batch, step_now, step_after, ledger.margins.bound_ms(Outcome.TPOT, worker.worker_id, step_after, error),
        room_wait_ms(worker, batch, request, step_now, now, headroom),
        ledger.queue(worker.worker_id).wait_ms(now, request.priority), ledger.queue(worker.worker_id).wait_ms(now),
        worker.predictors.calibrated_for(after), device, ledger.margins.settings.tpot_floor_ms,
    )  # fmt: skip


def room_wait_ms(
    worker: Worker, batch: DecodeBatch, request: Request, step_ms: float, now: float, headroom: float
) -> float:
    """How long until the decode worker has KV for the request (its prompt and every output token,
    the reservation watermark kept free) and a batch slot: 0 now, else when enough members are
    predicted to have left; inf when the whole cache could not hold it."""
    capacity = worker.info.kv_capacity_tokens
    if capacity and request.kv_tokens > capacity:
        return math.inf
    # The watermark keeps room for the batch to grow; a request alone may use all of the cache.
    kv_limit = max(capacity * (1 - headroom), request.kv_tokens) if capacity else 0
    slots = worker.info.capacity.max_num_running_requests
    excess_kv = batch.kv_tokens + request.kv_tokens - kv_limit if kv_limit else 0
    excess_slots = len(batch) + 1 - slots if slots else 0
    if excess_kv <= 0 and excess_slots <= 0:
        return 0.0
    freed_kv = 0
    leaving = sorted((remaining_tokens(m, step_ms, now) * step_ms, m.kv_tokens) for m in batch.members.values())
    for freed_slots, (leaves_ms, kv_tokens) in enumerate(leaving, 1):
        freed_kv += kv_tokens
        if freed_kv >= excess_kv and freed_slots >= excess_slots:
            return leaves_ms
    return math.inf


def local_prefill(side: DecodeSide, request: Request, cached: int) -> Prefill:
    """The request's prompt computed by its decode worker, chunks riding the batch's steps."""
    worker = side.worker
    model = worker.predictors.step
    budget = worker.info.capacity.max_num_batched_tokens or DEFAULT_BUDGET_TOKENS
    uncached = max(1, request.prompt_tokens - cached)
    n, context = len(side.batch), side.batch.context_tokens
    shape, steps = prefill_steps(uncached, request.prompt_tokens - uncached, budget, n, context)
    mixed = model.step_ms(shape, steps)
    device = side.device
    gain = mixed - steps * side.step_now_ms / device.pace if n else mixed
    start, duration = device.prompt_ms(side.local_wait_ms, mixed)
    return Prefill(
        worker, cached, start, duration, gain, steps, 0.0, worker.predictors.calibrated_for(shape),
        side.local_work_ms + device.queued_all_ms, duration / mixed if mixed > 0 else 1.0,
        device.delay_ms(side.local_wait_ms, mixed),
    )  # fmt: skip


def stall_fits(side: DecodeSide, prefill: Prefill, now: float, factor: float = 1.0) -> bool:
    """Whether every member with a TPOT target can absorb a prefill's stall on its device (a local
    prefill, or one on a prefill worker sharing its GPU): its remaining tokens at the new step time
    (its bound) plus the stall stay within its target. The stall is the prompt's compute and the
    prompt work already queued on the device (it stalls the same members: each admitted alone would
    fit, a burst of them not), times `factor` (how much the worker's TTFT bound grows per forecast
    millisecond). The queued work counts whole (its steps' decode rows included), which errs on
    the side of the running requests."""
    stall = (prefill.device_work_ms + prefill.compute_ms) * factor
    if prefill.compute_ms <= 0 or side.batch.min_tpot_ms <= 0 or not (prefill.calibrated and side.calibrated):
        return True  # an uncalibrated forecast (the stall's or the step's) refuses nothing
    for member in side.batch.members.values():
        if member.tpot_ms > 0:
            budget = remaining_tokens(member, side.step_now_ms, now) * (member.tpot_ms - side.step_bound_ms)
            if budget < stall:
                return False
    return True


def remaining_tokens(member: Booking, step_ms: float, now: float) -> float:
    """Tokens a member still has to generate, estimated from how long it has been decoding."""
    if member.decode_started is None or step_ms <= 0:
        return float(member.max_tokens)
    done = (now - member.decode_started) * 1000 / step_ms
    return max(1.0, member.max_tokens - done)


def first_departure_ms(side: DecodeSide, now: float) -> float:
    """When the first member of a decode worker's batch is predicted to leave (its KV and its slot
    free): the soonest a full or too-slow decode worker can take a request."""
    step = max(side.step_now_ms, 1e-3)
    return min((remaining_tokens(m, step, now) * step for m in side.batch.members.values()), default=0.0)
