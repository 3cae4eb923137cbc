"""The worker's load for each report, without waiting on a long engine step.

The engine answers questions only between steps, and on a busy CPU worker one step (a batch of
long prefills) can outlast the scheduler's staleness window: a report that waited for it arrived
too late, and the scheduler took a busy worker for a dead one ("decode workers: none is serving"
while the worker was alive and working). So a report waits for the engine only briefly; when the
step runs on, the report goes with the last load seen, and the engine's answer, with its prefix
cache changes, rides on a later report. The report itself is what says the worker is alive.
"""

from __future__ import annotations

import asyncio

from engine.async_engine import AsyncEngine
from engine.block_pool import KVEvents
from engine.engine import EngineStats

_WAIT_S = 0.2  # how long a report waits for the engine before going with the last load seen


class LoadSampler:
    def __init__(self, engine: AsyncEngine, wait_s: float = _WAIT_S) -> None:
        self._engine = engine
        self._wait_s = wait_s
        self._pending: asyncio.Future[tuple[EngineStats, KVEvents]] | None = None
        self._pending_snapshot = False
        self._last: EngineStats | None = None

    async def sample(self, snapshot: bool) -> tuple[EngineStats, KVEvents]:
        """(stats, prefix cache changes since the last sample); snapshot asks for every cached hash.
        When the engine is mid-step: the last stats seen and no changes (they come later, in order)."""
        if self._pending is not None and snapshot and not self._pending_snapshot:
            self._pending = None  # a snapshot supersedes the changes that call will bring
        if self._pending is None:
            self._pending_snapshot = snapshot
            ask = self._engine.call(lambda e: (e.stats(), e.pool.take_events(snapshot)))
            self._pending = asyncio.ensure_future(ask)
        done, _ = await asyncio.wait({self._pending}, timeout=self._wait_s)
        if not done and self._last is not None:
            return self._last, KVEvents()
        pending, self._pending = self._pending, None
        stats, events = await pending
        self._last = stats
        return stats, events
