"""A load report never waits out a long engine step: while a step runs, the report goes with the
last load seen, and the prefix cache's changes come on a later report, none lost. Nor does a lost
device stop the reports: they go with the last load seen, so the worker can say it drains."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.errors import DeviceLost
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


async def test_reports_go_on_with_the_last_load_once_the_device_is_lost(tiny_llama: Path) -> None:
    async_engine = AsyncEngine(make_engine(tiny_llama, num_blocks=64, inject_device_loss_at_step=2))
    sampler = LoadSampler(async_engine, wait_s=0.2)
    try:
        before, _ = await sampler.sample(snapshot=True)
        await _drain(async_engine.generate("r", list(range(1, 9)), greedy(4)), expect_loss=True)
        assert async_engine.lost is not None
        for _ in range(2):  # the DRAINING report, and the reports after it until the worker stops
            stats, events = await sampler.sample(snapshot=False)
            assert stats == before and not events.stored
    finally:
        async_engine.shutdown()


async def _drain(stream, expect_loss: bool = False) -> None:  # type: ignore[no-untyped-def]
    try:
        async for _ in stream:
            pass
    except DeviceLost:
        if not expect_loss:
            raise
