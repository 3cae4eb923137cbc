"""Admission: how many requests the scheduler lets into the mesh at once, and the bounded queue of
the rest.

A request enters the mesh (placement, the hand-off, the stream) only while fewer requests are in
it than the live decode workers have batch slots (the sum of their `max_num_running_requests`);
a decode worker runs its batch and nothing waits unseen in its engine's queue. The others wait
here, highest priority first and then in arrival order, until the request's queue budget runs out
(`give_up`: the door's one budget for all its waiting, here and for KV blocks after placement). So
the timeout holds for every plan, a decode worker's own prefill included, and the number queued is
known. A policy that predicts (`slo`) is asked before a request queues (`may_wait`): it refuses at
once a request it could not place in time, and bounds the wait of the others by what their TTFT
target leaves; a request is never refused only after waiting out its SLO here.

Refusals are RESOURCE_EXHAUSTED and say what to do: the queue is full (`max_queued_requests`), or
the wait ran out. With no live decode worker the gate is open: placement answers UNAVAILABLE at
once, rather than holding requests for a worker that may never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pdmesh.enums import Priority
from services.status import NoCapacity, SloUnattainable

_ORDER = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
_RECHECK_S = 0.25  # a waiter looks again this often: decode workers come and go without a signal


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]  # (priority order, arrival number): the heap's order
    granted: asyncio.Future[None] = field(compare=False)


@dataclass(frozen=True)
class _Limit:
    """Until when a request may wait here, and whether its SLO (not the queue budget) set that."""

    at: float  # time.monotonic()
    slo: bool

    def expired(self, waited_s: float) -> NoCapacity:
        """The refusal of a request that waited `waited_s`, all it was allowed."""
        if self.slo:
            return SloUnattainable(
                "slo", f"waited {waited_s * 1000:.0f} ms for a decode slot, all its TTFT target leaves",
                f"retry in {_RECHECK_S:.2f} s, relax ttft_ms, or add decode workers", retry_after_s=_RECHECK_S,
            )  # fmt: skip
        return NoCapacity(
            "queue_timeout_ms", f"waited {waited_s * 1000:.0f} ms for a decode slot",
            "retry later, allow a longer wait (a larger ttft_ms), or add decode workers",
        )  # fmt: skip


class Admission:
    def __init__(self, slots: Callable[[], int | None], max_queued: int) -> None:
        """`slots`: how many requests may be in the mesh now; None: no limit (the gate is open)."""
        self._slots = slots
        self._max_queued = max_queued
        self._heap: list[_Waiter] = []
        self._arrivals = itertools.count()
        self.admitted = 0  # requests in the mesh now
        self.queued = 0  # requests waiting here now

    @contextlib.asynccontextmanager
    async def admit(
        self, priority: Priority, give_up: float, may_wait: Callable[[], float] | None = None
    ) -> AsyncIterator[None]:
        """Inside: the request is in the mesh. Raises NoCapacity when the queue is full or the
        wait outlasts `give_up` (time.monotonic()). `may_wait`, asked only when the request must
        queue: how many seconds it may (the policy's refusal, raised, when none)."""
        await self._enter(priority, give_up, may_wait)
        try:
            yield
        finally:
            self.admitted -= 1
            self._grant()

    async def _enter(self, priority: Priority, give_up: float, may_wait: Callable[[], float] | None) -> None:
        if not self._heap and self._has_room():
            self.admitted += 1
            return
        if self.queued >= self._max_queued:
            raise NoCapacity(
                "queue", f"{self.queued} requests are already waiting for a decode slot (max_queued_requests)",
                "retry later with backoff, or add decode workers",
            )  # fmt: skip
        limit = _Limit(give_up, slo=False)
        if may_wait is not None:
            budget = may_wait()  # the policy's refusal, when it could not place the request in time
            if time.monotonic() + budget < give_up:
                limit = _Limit(time.monotonic() + budget, slo=True)
        allowed = limit.at - time.monotonic()
        if allowed <= 0:
            raise limit.expired(0.0)
        waiter = _Waiter((_ORDER[priority], next(self._arrivals)), asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        self.queued += 1
        try:
            await self._wait(waiter, limit, allowed)
        except BaseException:  # timed out, or the client left
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.admitted -= 1  # let in as it left: the slot goes to the next
                self._grant()
            waiter.granted.cancel()  # _grant skips it
            raise
        finally:
            self.queued -= 1

    async def _wait(self, waiter: _Waiter, limit: _Limit, allowed_s: float) -> None:
        while not waiter.granted.done():
            self._grant()
            left = limit.at - time.monotonic()
            if left <= 0:
                raise limit.expired(allowed_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter.granted), min(left, _RECHECK_S))

    def _grant(self) -> None:
        """Let in as many waiters, best first, as there is room for."""
        while self._heap and self._has_room():
            waiter = heapq.heappop(self._heap)
            if not waiter.granted.done():
                waiter.granted.set_result(None)
                self.admitted += 1

    def _has_room(self) -> bool:
        slots = self._slots()
        return slots is None or self.admitted < slots
