"""Admission: how many requests the scheduler lets into the mesh at once, and the bounded queue of
the rest.

A request enters the mesh (placement, the hand-off, the stream) only while fewer requests are in
it than the live decode workers have batch slots (the sum of their `max_num_running_requests`);
a decode worker runs its batch and nothing waits unseen in its engine's queue. The others wait
here, highest priority first and then in arrival order, for at most the queue timeout (less with
a TTFT target: a request that waited past its target has already missed it). So the timeout holds
for every plan, a decode worker's own prefill included, and the number queued is known.

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
from services.status import NoCapacity

_ORDER = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
_RECHECK_S = 0.25  # a waiter looks again this often: decode workers come and go without a signal


@dataclass(order=True)
class _Waiter:
    rank: tuple[int, int]  # (priority order, arrival number): the heap's order
    granted: asyncio.Future[None] = field(compare=False)


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
    async def admit(self, priority: Priority, timeout_s: float) -> AsyncIterator[None]:
        """Inside: the request is in the mesh. Raises NoCapacity when the queue is full or the
        wait outlasts `timeout_s`."""
        await self._enter(priority, timeout_s)
        try:
            yield
        finally:
            self.admitted -= 1
            self._grant()

    async def _enter(self, priority: Priority, timeout_s: float) -> None:
        if not self._heap and self._has_room():
            self.admitted += 1
            return
        if self.queued >= self._max_queued:
            raise NoCapacity(
                "queue", f"{self.queued} requests are already waiting for a decode slot (max_queued_requests)",
                "retry later with backoff, or add decode workers",
            )  # fmt: skip
        waiter = _Waiter((_ORDER[priority], next(self._arrivals)), asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, waiter)
        self.queued += 1
        try:
            await self._wait(waiter, timeout_s)
        except BaseException:  # timed out, or the client left
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.admitted -= 1  # let in as it left: the slot goes to the next
                self._grant()
            waiter.granted.cancel()  # _grant skips it
            raise
        finally:
            self.queued -= 1

    async def _wait(self, waiter: _Waiter, timeout_s: float) -> None:
        give_up = time.monotonic() + timeout_s
        while not waiter.granted.done():
            self._grant()
            left = give_up - time.monotonic()
            if left <= 0:
                raise NoCapacity(
                    "queue_timeout_ms", f"waited {timeout_s * 1000:.0f} ms for a decode slot",
                    "retry later, allow a longer wait (a larger ttft_ms), or add decode workers",
                )  # fmt: skip
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
