"""What the scheduler has placed on each worker and not seen end, with the work it predicted.

Load reports arrive every few hundred milliseconds; placements happen between them, many at a
time. So the scheduler keeps its own book of every request it placed: on a worker's prefill queue
(a prefill worker's, or a decode worker's when it prefills locally) with its predicted compute,
and in a decode worker's batch from placement (its KV is reserved then) to its end. Policies read
the book to predict queue waits and step times; the request's flow (or the simulator, at the same
moments) writes it: `book` when placed, `prefilled` at the first token, `end` when it leaves.

A prefill queue drains one millisecond of predicted work per millisecond (higher priorities
first, as the engine's batcher runs them); each first token restarts that clock from the work
still pending, so a queue's prediction is corrected by every completion it sees.

Bookings carry what the policy predicted (TTFT from placement, TPOT); the first token and the end
score those forecasts against what happened (margin.Margins), which is how the `slo` policy learns
how wrong it has lately been on each worker.

For placement over many workers, each role's workers are also kept in heaps by load (`LoadHeap`):
the least loaded are found in O(k log n) rather than by visiting every worker.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.scheduler.margin import Margins, Outcome

NUM_PRIORITIES = 3  # pdmesh.enums.Priority ranks: 0 low, 1 normal, 2 high


@dataclass(slots=True, eq=False)
class Booking:
    """One placed request as the ledger keeps it."""

    request_id: str
    priority: int  # Priority.rank
    prompt_tokens: int
    max_tokens: int
    tpot_ms: float  # its TPOT target; 0: none
    prefill_ms: float  # predicted compute on its prefill queue
    prefill_worker: str | None  # whose prefill queue it is on; None once prefilled
    decode_worker: str
    decode_started: float | None = None  # when its first token was sent
    placed_at: float = 0.0  # the clock when it was placed
    predicted_ttft_ms: float | None = None  # from placement; None: the policy does not predict
    predicted_tpot_ms: float | None = None

    @property
    def kv_tokens(self) -> int:
        """KV it holds on its decode worker at the end: prompt and every output token."""
        return self.prompt_tokens + self.max_tokens

    @property
    def mean_context(self) -> int:
        """Context its decode rows attend, averaged over its life."""
        return self.prompt_tokens + self.max_tokens // 2


class PrefillQueue:
    """Prompt work placed on one worker and not yet done."""

    def __init__(self) -> None:
        self.pending: dict[str, Booking] = {}
        self.work_ms = [0.0] * NUM_PRIORITIES  # pending predicted work per priority
        self.epoch = 0.0  # since when the pending work has been draining

    def wait_ms(self, now: float, priority: int = 0) -> float:
        """Predicted time until work of `priority` or higher placed now could start."""
        ahead = sum(self.work_ms[priority:])
        return max(0.0, ahead - (now - self.epoch) * 1000) if ahead else 0.0

    @property
    def busy_until(self) -> float:
        """When the queue is predicted to be empty (a time of the clock; it moves only on changes)."""
        return self.epoch + sum(self.work_ms) / 1000

    def add(self, booking: Booking, now: float) -> None:
        if not self.pending:
            self.epoch = now
        self.pending[booking.request_id] = booking
        self.work_ms[booking.priority] += booking.prefill_ms

    def remove(self, booking: Booking, now: float, completed: bool) -> None:
        if self.pending.pop(booking.request_id, None) is None:
            return
        self.work_ms[booking.priority] -= booking.prefill_ms
        if not self.pending:
            self.work_ms = [0.0] * NUM_PRIORITIES  # no drift from float sums
        if completed:
            self.epoch = now  # what is left starts draining now: the measured truth so far


class DecodeBatch:
    """The requests a decode worker runs or will run (reserved), in aggregate."""

    def __init__(self) -> None:
        self.members: dict[str, Booking] = {}
        self.context_tokens = 0  # sum of members' mean context
        self.kv_tokens = 0
        self._tpots: Counter[float] = Counter()

    def __len__(self) -> int:
        return len(self.members)

    @property
    def min_tpot_ms(self) -> float:
        """The tightest TPOT target among the members (0: none has one)."""
        return min(self._tpots, default=0.0)

    def add(self, booking: Booking) -> None:
        self.members[booking.request_id] = booking
        self.context_tokens += booking.mean_context
        self.kv_tokens += booking.kv_tokens
        if booking.tpot_ms > 0:
            self._tpots[booking.tpot_ms] += 1

    def remove(self, booking: Booking) -> None:
        if self.members.pop(booking.request_id, None) is None:
            return
        self.context_tokens -= booking.mean_context
        self.kv_tokens -= booking.kv_tokens
        if booking.tpot_ms > 0:
            self._tpots[booking.tpot_ms] -= 1
            if not self._tpots[booking.tpot_ms]:
                del self._tpots[booking.tpot_ms]


class LoadHeap:
    """Worker ids by a load key, smallest first. Keys change by pushing a new entry; old entries
    are skipped when met (lazy deletion) and the heap is rebuilt when they pile up."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._keys: dict[str, float] = {}

    def update(self, worker_id: str, key: float) -> None:
        if self._keys.get(worker_id) == key:
            return
        self._keys[worker_id] = key
        heapq.heappush(self._heap, (key, worker_id))
        if len(self._heap) > 4 * len(self._keys) + 64:
            self._heap = [(k, w) for w, k in self._keys.items()]
            heapq.heapify(self._heap)

    def smallest(self, k: int, accept: Callable[[str], bool]) -> list[str]:
        """Up to `k` accepted worker ids, least loaded first."""
        out: list[str] = []
        popped: list[tuple[float, str]] = []
        while self._heap and len(out) < k:
            entry = heapq.heappop(self._heap)
            key, worker_id = entry
            if self._keys.get(worker_id) != key or (popped and popped[-1] == entry):
                continue  # superseded (or a duplicate of the entry just taken)
            popped.append(entry)
            if accept(worker_id):
                out.append(worker_id)
        for entry in popped:
            heapq.heappush(self._heap, entry)
        return out


class Ledger:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.bookings: dict[str, Booking] = {}
        self.queues: dict[str, PrefillQueue] = {}
        self.batches: dict[str, DecodeBatch] = {}
        self.by_queue = LoadHeap()  # prefill workers by when their queues empty
        self.by_batch = LoadHeap()  # decode workers by a key the policy sets (its predicted step time)
        self.batch_key: Callable[[str, DecodeBatch], float] = lambda _, batch: float(len(batch))
        self.margins = Margins(clock=clock)  # forecasts against outcomes (the slo policy configures and reads it)
        self._decode: dict[str, bool] = {}

    def track(self, worker_id: str, decode: bool) -> None:
        """A worker placement may use (registered): in its role's heap before anything is booked."""
        self._decode[worker_id] = decode
        if decode:
            self._batch_changed(worker_id)
        else:
            self._queue_changed(worker_id)

    def queue(self, worker_id: str) -> PrefillQueue:
        queue = self.queues.get(worker_id)
        if queue is None:
            queue = self.queues[worker_id] = PrefillQueue()
        return queue

    def batch(self, worker_id: str) -> DecodeBatch:
        batch = self.batches.get(worker_id)
        if batch is None:
            batch = self.batches[worker_id] = DecodeBatch()
        return batch

    def book(self, booking: Booking) -> None:
        self.end(booking.request_id)  # placed again (after a failure): the old booking goes
        self.bookings[booking.request_id] = booking
        if booking.prefill_worker is not None:
            self.queue(booking.prefill_worker).add(booking, self.clock())
            self._queue_changed(booking.prefill_worker)
        self.batch(booking.decode_worker).add(booking)
        self._batch_changed(booking.decode_worker)

    def prefilled(self, request_id: str) -> None:
        """Its first token was sent: its prompt work is done and its decode has started."""
        booking = self.bookings.get(request_id)
        if booking is None or booking.decode_started is not None:
            return
        now = self.clock()
        booking.decode_started = now
        if booking.prefill_worker is not None and booking.predicted_ttft_ms is not None:
            measured = (now - booking.placed_at) * 1000
            self.margins.observe(
                Outcome.TTFT, booking.prefill_worker, booking.predicted_ttft_ms, measured, booking.placed_at
            )
        if booking.prefill_worker is not None:
            worker, booking.prefill_worker = booking.prefill_worker, None
            self.queue(worker).remove(booking, now, completed=True)
            self._queue_changed(worker)

    def end(self, request_id: str, num_tokens: int = 0) -> None:
        """It left the mesh (finished, failed, cancelled) or is being placed again; `num_tokens`:
        the tokens it generated (its TPOT is scored when there were at least two)."""
        booking = self.bookings.pop(request_id, None)
        if booking is None:
            return
        started, predicted = booking.decode_started, booking.predicted_tpot_ms
        if started is not None and predicted is not None and num_tokens >= 2:
            measured = (self.clock() - started) * 1000 / (num_tokens - 1)
            self.margins.observe(Outcome.TPOT, booking.decode_worker, predicted, measured, booking.placed_at)
        if booking.prefill_worker is not None:
            self.queue(booking.prefill_worker).remove(booking, self.clock(), completed=False)
            self._queue_changed(booking.prefill_worker)
        self.batch(booking.decode_worker).remove(booking)
        self._batch_changed(booking.decode_worker)

    def move_decode(self, request_id: str, worker_id: str) -> None:
        """Its KV was reserved on another decode worker than placed (the first was full)."""
        booking = self.bookings.get(request_id)
        if booking is None or booking.decode_worker == worker_id:
            return
        self.batch(booking.decode_worker).remove(booking)
        self._batch_changed(booking.decode_worker)
        booking.decode_worker = worker_id
        self.batch(worker_id).add(booking)
        self._batch_changed(worker_id)

    def members(self, worker_id: str) -> Iterable[Booking]:
        batch = self.batches.get(worker_id)
        return batch.members.values() if batch is not None else ()

    def _queue_changed(self, worker_id: str) -> None:
        if self._decode.get(worker_id):
            self._batch_changed(worker_id)  # a decode worker's local prefills weigh on its batch
        else:
            self.by_queue.update(worker_id, self.queue(worker_id).busy_until)

    def _batch_changed(self, worker_id: str) -> None:
        self.by_batch.update(worker_id, self.batch_key(worker_id, self.batch(worker_id)))
