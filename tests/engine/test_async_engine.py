"""The async engine under trouble: a lost device ends it cleanly, a slow reader loses nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine
from engine.errors import DeviceLost
from engine.request import FinishReason
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion


async def test_a_lost_device_fails_every_request_refuses_new_ones_and_tells_the_owner(tiny_llama: Path) -> None:
    told: list[DeviceLost] = []
    async_engine = AsyncEngine(make_engine(tiny_llama, num_blocks=64, inject_device_loss_at_step=4), told.append)
    try:

        async def tokens_until_failure(rid: str, prompt: list[int]) -> tuple[int, BaseException | None]:
            n = 0
            try:
                async for out in async_engine.generate(rid, prompt, greedy(50)):
                    n += len(out.new_token_ids)
            except DeviceLost as e:
                return n, e
            return n, None

        results = await asyncio.gather(tokens_until_failure("a", [1, 2, 3]), tokens_until_failure("b", [4, 5]))
        # Step 1 prefills both and samples their first tokens; steps 2 and 3 add one each; step 4 fails.
        assert [n for n, _ in results] == [3, 3]
        assert all(isinstance(e, DeviceLost) and "injected at step 4" in str(e) for _, e in results)
        assert len(told) == 1 and told[0] is async_engine.lost
        with pytest.raises(DeviceLost):
            async for _ in async_engine.generate("c", [1, 2], greedy(2)):
                pass
        with pytest.raises(DeviceLost):
            await async_engine.stats()
    finally:
        async_engine.shutdown()


async def test_a_reader_that_falls_behind_gets_the_queued_outputs_merged_and_every_token(tiny_llama: Path) -> None:
    expected_engine = make_engine(tiny_llama, num_blocks=64)
    expected_engine.add_request("slow", [7, 8, 9], greedy(30))
    expected = run_to_completion(expected_engine)["slow"]
    async_engine = AsyncEngine(make_engine(tiny_llama, num_blocks=64))
    try:
        outputs = []
        async for out in async_engine.generate("slow", [7, 8, 9], greedy(30)):
            outputs.append(out)
            if len(outputs) == 1:
                await asyncio.sleep(0.5)  # the engine runs on meanwhile
        assert [t for o in outputs for t in o.new_token_ids] == expected
        assert len(outputs) < len(expected)
        assert outputs[-1].finished and outputs[-1].num_output_tokens == 30
    finally:
        async_engine.shutdown()


class _BrokenExport:
    """A KV export whose transport is gone: every layer push raises (engine.handoff.KVExportSink)."""

    def push_layer(self, layer: int, kv_layer: object, block_ids: object, num_tokens: int) -> None:
        raise RuntimeError("the KV transport is gone")

    def close(self) -> None:
        pass

    def cancel(self, reason: str) -> None:
        pass


async def test_steps_that_keep_failing_mean_the_device_is_lost_though_the_probe_passes(tiny_llama: Path) -> None:
    async_engine = AsyncEngine(make_engine(tiny_llama, num_blocks=64))
    try:
        errors = []
        for i in range(3):
            with pytest.raises(Exception) as failed:
                async for _ in async_engine.generate(f"r{i}", [1, 2, 3], greedy(2), kv_export=_BrokenExport()):
                    pass
            errors.append(failed.value)
        assert [type(e) for e in errors] == [RuntimeError, RuntimeError, DeviceLost]
        assert "3 steps in a row failed" in str(errors[2]) and "KV transport is gone" in str(errors[2])
    finally:
        async_engine.shutdown()


async def test_on_cpu_a_steps_outputs_reach_their_caller_before_the_next_step_computes(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, num_blocks=64)
    received = threading.Event()
    seen_during_next_step: list[bool] = []
    execute = engine.runner.execute

    def execute_and_look(inputs):  # type: ignore[no-untyped-def]
        if engine.num_steps == 2:  # the step after the one that finishes "short"
            seen_during_next_step.append(received.wait(10))
        return execute(inputs)

    engine.runner.execute = execute_and_look  # type: ignore[method-assign]
    async_engine = AsyncEngine(engine)
    try:
        long = asyncio.create_task(_drain(async_engine.generate("long", [4, 5, 6], greedy(20))))
        async for out in async_engine.generate("short", [1, 2, 3], greedy(1)):
            assert out.finished
            received.set()
        await long
        assert seen_during_next_step == [True], "the output waited for the next step's compute"
    finally:
        async_engine.shutdown()


async def test_the_step_loop_summary_names_what_ran_between_steps(tiny_llama: Path) -> None:
    async_engine = AsyncEngine(make_engine(tiny_llama, num_blocks=64))
    try:
        await _drain(async_engine.generate("a", [1, 2, 3], greedy(2)))
        await async_engine.stats()
        await async_engine.stats()
        await async_engine.call(lambda e: e.take_finished_chains())
    finally:
        async_engine.shutdown()
    commands = async_engine.engine.step_times.summary()["commands"]
    assert isinstance(commands, dict)
    # name -> [count, ms, cpu ms, max ms]; a lambda is named after the function that made it
    assert commands["AsyncEngine.generate.add"][0] == 1
    assert commands["AsyncEngine.stats"][0] == 2
    assert commands["test_the_step_loop_summary_names_what_ran_between_steps"][0] == 1
    assert all(ms >= 0 and cpu >= 0 and top <= ms for _, ms, cpu, top in commands.values())


async def _drain(stream) -> None:  # type: ignore[no-untyped-def]
    async for _ in stream:
        pass


def test_a_command_queued_while_the_engine_stops_mid_step_is_refused_not_left_waiting(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tiny_llama)
    in_step, go_on = threading.Event(), threading.Event()
    real_step = engine.step_held  # the async engine's step

    def held_step(*args: object, **kwargs: object) -> object:
        in_step.set()
        go_on.wait(10)
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "step_held", held_step)
    async_engine = AsyncEngine(engine)
    async_engine.submit(lambda e: e.add_request("r", [1, 2, 3], greedy(50)))
    assert in_step.wait(10)
    queued = async_engine.submit(lambda e: "ran")  # taken while the step runs
    stopping = threading.Thread(target=async_engine.shutdown)
    stopping.start()
    while not async_engine._stop.is_set():
        time.sleep(0.001)
    go_on.set()
    stopping.join(30)
    with pytest.raises(RuntimeError, match="shut down"):
        queued.result(timeout=10)  # refused at the end, where it used to wait forever
    with pytest.raises(RuntimeError, match="shut down"):
        async_engine.submit(lambda e: "late")


@pytest.mark.parametrize("hold_outputs", [True, False], ids=["held", "plain"])
async def test_an_id_used_again_at_once_streams_only_the_new_requests_tokens(
    tiny_llama: Path, hold_outputs: bool
) -> None:
    # A caller leaves a request after its first output, which aborts it, and at once starts another
    # under the same id. The first request's latest outputs may not have been handed over yet (held
    # ones go during the next step, which may come after the new request is added): they belong to
    # the stream that was left, never to the new one.
    reference = make_engine(tiny_llama, num_blocks=64)
    reference.add_request("again", [4, 5, 6], greedy(5))
    expected = run_to_completion(reference)["again"]
    async_engine = AsyncEngine(make_engine(tiny_llama, num_blocks=64), hold_outputs=hold_outputs)
    try:
        for _ in range(5):
            left = async_engine.generate("again", [1, 2, 3], greedy(50))
            await anext(left)
            await left.aclose()
            outputs = [out async for out in async_engine.generate("again", [4, 5, 6], greedy(5))]
            assert [t for o in outputs for t in o.new_token_ids] == expected
            assert outputs[-1].finished and outputs[-1].num_output_tokens == 5
        stats = await async_engine.stats()
        assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, 64)
    finally:
        async_engine.shutdown()


def test_a_shutdown_behind_a_hung_step_gives_up_within_its_timeout_and_says_so(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker stopping while a step hangs (its device stuck) must not wait past what pdmesh up
    leaves it before a SIGKILL: the shutdown returns after the timeout it is given, logging why."""
    engine = make_engine(tiny_llama)
    in_step, go_on = threading.Event(), threading.Event()
    real_step = engine.step_held

    def hung_step(*args: object, **kwargs: object) -> object:
        in_step.set()
        go_on.wait(60)
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "step_held", hung_step)
    async_engine = AsyncEngine(engine)
    try:
        async_engine.submit(lambda e: e.add_request("r", [1, 2, 3], greedy(5)))
        assert in_step.wait(10)
        started = time.monotonic()
        with caplog.at_level("INFO", logger="engine.async_engine"):
            assert async_engine.shutdown(join_timeout_s=0.5) is False
        assert 0.5 <= time.monotonic() - started < 10
        (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
        assert "did not end within 0.5 s" in error.getMessage()
    finally:
        go_on.set()
    assert async_engine.shutdown(join_timeout_s=30) is True  # the step ended: the thread does too


def _first_output_seen_before_step(engine, step: int) -> threading.Event:  # type: ignore[no-untyped-def]
    """An event the test sets once the first output reached it; `step` waits for it (so the
    reader cannot be late for the first token and find the next ones queued behind it)."""
    seen = threading.Event()
    execute = engine.runner.execute

    def execute_after_the_first_output(inputs):  # type: ignore[no-untyped-def]
        if engine.num_steps == step and not seen.wait(10):
            raise AssertionError("the first output did not reach the reader within 10 s")
        return execute(inputs)

    engine.runner.execute = execute_after_the_first_output
    return seen


@pytest.mark.parametrize(("interval", "max_tokens"), [(4, 30), (100, 10)], ids=["chunks", "interval-past-the-end"])
async def test_a_stream_interval_sends_the_first_token_at_once_then_chunks_of_n_and_the_end_at_once(
    tiny_llama: Path, interval: int, max_tokens: int
) -> None:
    reference = make_engine(tiny_llama, num_blocks=64)
    reference.add_request("r", [7, 8, 9], greedy(max_tokens))
    every_token = [out for _ in range(max_tokens) for out in reference.step()]  # interval 1's outputs
    expected = [t for o in every_token for t in o.new_token_ids]
    engine = make_engine(tiny_llama, num_blocks=64)
    first_seen = _first_output_seen_before_step(engine, 2)
    async_engine = AsyncEngine(engine, stream_interval=interval)
    try:
        outputs = []
        async for out in async_engine.generate("r", [7, 8, 9], greedy(max_tokens)):
            outputs.append(out)
            first_seen.set()
        sizes = [len(o.new_token_ids) for o in outputs]
        assert sizes[0] == 1  # the first token went alone, at once
        assert all(n >= interval for n in sizes[1:-1]), sizes
        assert sum(sizes) == max_tokens and len(outputs) <= 1 + -(-(max_tokens - 1) // interval)
        assert [t for o in outputs for t in o.new_token_ids] == expected
        last = outputs[-1]
        assert last.finished and last.finish_reason is FinishReason.LENGTH
        assert (last.num_output_tokens, last.num_prompt_tokens) == (max_tokens, 3)
        assert "".join(o.text_delta for o in outputs) == "".join(o.text_delta for o in every_token)
    finally:
        async_engine.shutdown()


async def test_a_stream_left_mid_interval_ends_at_once_and_its_request_frees_its_blocks(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, num_blocks=64)
    first_seen = _first_output_seen_before_step(engine, 2)
    in_step_6, go_on = threading.Event(), threading.Event()
    execute = engine.runner.execute

    def execute_held_at_step_6(inputs):  # type: ignore[no-untyped-def]
        if engine.num_steps == 6:
            in_step_6.set()
            go_on.wait(10)
        return execute(inputs)

    engine.runner.execute = execute_held_at_step_6  # type: ignore[method-assign]
    async_engine = AsyncEngine(engine, stream_interval=1000)
    try:
        received: list[int] = []

        async def read() -> None:
            async for out in async_engine.generate("left", [1, 2, 3], greedy(200)):
                received.extend(out.new_token_ids)
                first_seen.set()

        reader = asyncio.create_task(read())
        assert await asyncio.to_thread(in_step_6.wait, 10)  # 5 tokens made: the first sent, 4 waiting
        reader.cancel()  # as a cancelled or deadlined gRPC call does
        with pytest.raises(asyncio.CancelledError):
            await reader
        go_on.set()
        assert len(received) == 1
        stats = await async_engine.stats()
        assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (0, 0, 64)
    finally:
        go_on.set()
        async_engine.shutdown()


async def test_an_error_reaches_a_stream_at_once_after_the_tokens_waiting_in_its_interval(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, num_blocks=64, inject_device_loss_at_step=6)
    async_engine = AsyncEngine(engine, stream_interval=100)
    try:
        received: list[int] = []
        with pytest.raises(DeviceLost):
            async for out in async_engine.generate("r", [1, 2, 3], greedy(50)):
                received.extend(out.new_token_ids)
        assert len(received) == 5  # steps 1-5 made one each; step 6 failed
    finally:
        async_engine.shutdown()
