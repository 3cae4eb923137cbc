"""A load report never waits out a long engine step: while a step runs, the report goes with the
last load seen, and the prefix cache's changes come on a later report, none lost."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from engine.async_engine import AsyncEngine
from services.worker.load import LoadSampler
from tests.engine.engine_helpers import greedy, make_engine


async def test_a_report_during_a_long_step_goes_with_the_last_load_and_loses_no_cache_change(
    tiny_llama: Path,
) -> None:
    engine = make_engine(tiny_llama, num_blocks=64)
    in_step, release = threading.Event(), threading.Event()
    execute = engine.runner.execute

    def slow_execute(inputs):  # type: ignore[no-untyped-def]
        in_step.set()
        release.wait(30)  # a step that outlasts the scheduler's staleness window
        return execute(inputs)

    async_engine = AsyncEngine(engine)
    sampler = LoadSampler(async_engine, wait_s=0.2)
    try:
        idle, first_events = await sampler.sample(snapshot=True)
        assert first_events.snapshot and idle.num_running == 0
        engine.runner.execute = slow_execute  # type: ignore[method-assign]
        stream = async_engine.generate("r", list(range(1, 17)), greedy(1))
        consumer = asyncio.create_task(_drain(stream))
        await asyncio.to_thread(in_step.wait, 30)

        started = time.monotonic()
        during, events = await sampler.sample(snapshot=False)
        assert time.monotonic() - started < 5, "the report waited for the step"
        assert during == idle and not events.stored  # the last load seen; changes come later

        release.set()
        await consumer
        after, later_events = await sampler.sample(snapshot=False)
        while not later_events.stored:  # the 16-token prompt filled cacheable blocks
            after, later_events = await sampler.sample(snapshot=False)
        assert not later_events.snapshot
    finally:
        release.set()
        async_engine.shutdown()


async def _drain(stream) -> None:  # type: ignore[no-untyped-def]
    async for _ in stream:
        pass
