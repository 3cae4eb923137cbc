"""The worker's load for each report, without waiting on a long engine step.

The engine answers questions only between steps, and on a busy CPU worker one step (a batch of
long prefills) can outlast the scheduler's staleness window: a report that waited for it arrived
too late, and the scheduler took a busy worker for a dead one ("decode workers: none is serving"
while the worker was alive and working). So a report waits for the engine only briefly; when the
step runs on, the report goes with the last load seen, and the engine's answer, with its prefix
cache changes, rides on a later report. The report itself is what says the worker is alive.
The engine's step samples (engine/step_samples.py, for the scheduler's predictors) come with its
answer, and ride on the report that follows it (`take_steps`).

An engine whose device is lost answers nothing again; its worker's reports still go, with the
last load seen: the first of them says DRAINING, which takes the worker out of placement and out
of the prefill workers' pre-connect lists at once. (A sample that raised DeviceLost lost that
report, the worker stayed listed until its reports went stale, and prefill workers kept dialing
its KV listener while it shut down.)
"""

from __future__ import annotations

import asyncio

from engine.async_engine import AsyncEngine
from engine.block_pool import KVEvents
from engine.engine import EngineStats
from engine.errors import DeviceLost
from engine.step_samples import StepSample

_WAIT_S = 0.2  # how long a report waits for the engine before going with the last load seen
SAMPLES_PER_REPORT = 64  # step (and push) samples a report carries at most: plenty for the predictors' fit


class LoadSampler:
    def __init__(self, engine: AsyncEngine, wait_s: float = _WAIT_S) -> None:
        self._engine = engine
        self._wait_s = wait_s
        self._pending: asyncio.Future[tuple[EngineStats, KVEvents, list[StepSample]]] | None = None
        self._pending_snapshot = False
        self._last: EngineStats | None = None
        self._steps: list[StepSample] = []

    async def sample(self, snapshot: bool) -> tuple[EngineStats, KVEvents]:
        """(stats, prefix cache changes since the last sample); snapshot asks for every cached hash.
        When the engine is mid-step: the last stats seen and no changes (they come later, in order)."""
        if self._engine.lost is not None and self._last is not None:
            return self._last, KVEvents()  # a lost engine answers nothing; the report still goes
        if self._pending is not None and snapshot and not self._pending_snapshot:
            self._pending = None  # a snapshot supersedes the changes that call will bring
        if self._pending is None:
            self._pending_snapshot = snapshot
            ask = self._engine.call(
                lambda e: (e.stats(), e.pool.take_events(snapshot), e.steps.take(SAMPLES_PER_REPORT))
            )
            self._pending = asyncio.ensure_future(ask)
        done, _ = await asyncio.wait({self._pending}, timeout=self._wait_s)
        if not done and self._last is not None:
            return self._last, KVEvents()
        pending, self._pending = self._pending, None
        try:
            stats, events, steps = await pending
        except DeviceLost:
            if self._last is None:
                raise
            return self._last, KVEvents()
        self._last = stats
        self._steps = (self._steps + steps)[-SAMPLES_PER_REPORT:]
        return stats, events

    def take_steps(self) -> list[StepSample]:
        """The engine's step samples its answers brought since the last take."""
        steps, self._steps = self._steps, []
        return steps
