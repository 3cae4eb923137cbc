"""Virtual time: events at a time run in the order they were scheduled (a sequence number breaks
ties), so a run is a pure function of its inputs and seed."""

from __future__ import annotations

import heapq
from collections.abc import Callable


class EventLoop:
    def __init__(self) -> None:
        self._now = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []

    def now(self) -> float:
        """Seconds since the start of the run."""
        return self._now

    def at(self, time_s: float, callback: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(time_s, self._now), self._seq, callback))

    def after(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.at(self._now + delay_s, callback)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run events in time order until none is left (or `until()` holds after one)."""
        heap = self._heap
        while heap:
            self._now, _, callback = heapq.heappop(heap)
            callback()
            if until is not None and until():
                return
