"""The engine's face to callers: bad input is refused by name, aborts free everything, the
async loop survives a failing request and keeps serving the others."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequest, OutOfBlocks, RequestNotFound
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion


@pytest.fixture(scope="module")
def engine(tiny_llama: Path):
    return make_engine(tiny_llama, num_blocks=64)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], greedy(4), "prompt"),
        ([1] * 500, greedy(100), "max_tokens"),
        ([1] * 512, greedy(1), "prompt"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p"),
        ([1, 2], SamplingParams(temperature=float("nan")), "temperature"),
        ([1, 2], SamplingParams(temperature=float("inf")), "temperature"),
        ([1, 2], SamplingParams(repetition_penalty=float("nan")), "repetition_penalty"),
        ([1, 2], SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
        ([1, 2], SamplingParams(min_p=float("-inf")), "min_p"),
        ([1, 2], SamplingParams(stop=tuple(f"s{i}" for i in range(17))), "stop"),
        ([1, 99999], greedy(4), "prompt_token_ids"),
    ],
)
def test_bad_input_names_the_field_and_leaves_the_engine_clean(engine, prompt, params, field) -> None:
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("bad", prompt, params)
    assert err.value.field == field
    assert field in str(err.value)
    assert not engine.has_work() and "bad" not in engine.requests


def test_a_request_larger_than_the_whole_cache_is_refused(engine) -> None:
    with pytest.raises(OutOfBlocks, match="whole cache has 64"):
        engine.add_request("huge", [1] * 200, greedy(100))  # 300 tokens = 75 blocks of 4


def test_abort_at_any_moment_releases_every_block(engine) -> None:
    total = engine.stats().num_blocks
    engine.add_request("a", list(range(30)), greedy(20))
    engine.add_request("b", list(range(40, 60)), greedy(20))
    engine.step()
    engine.step()
    engine.abort("a")
    assert engine.abort("b").finish_reason is FinishReason.ABORT
    assert engine.stats().num_free_blocks == total
    with pytest.raises(RequestNotFound):
        engine.abort("a")


def test_a_reservation_never_used_is_released_by_abort(engine) -> None:
    total = engine.stats().num_blocks
    blocks = engine.reserve("held", 10)
    assert len(blocks) == 3 and engine.stats().num_reserved_blocks == 3
    engine.abort("held")
    assert engine.stats().num_free_blocks == total


def test_stop_token_ids_and_max_tokens_finish_with_the_right_reason(engine) -> None:
    engine.add_request("len", [5, 6, 7], greedy(3))
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH
    first = outs[0].new_token_ids[0]
    engine.add_request("stop", [5, 6, 7], SamplingParams(max_tokens=5, stop_token_ids=(first,)))
    out = engine.step()[0]
    assert out.finish_reason is FinishReason.STOP and out.new_token_ids == [first]
    assert out.stop == first and outs[-1].stop is None


async def test_async_engine_streams_and_survives_bad_requests(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, num_blocks=64)
    sync_expected = None
    async_engine = AsyncEngine(engine)
    try:

        async def collect(rid: str, prompt: list[int]) -> list[int]:
            return [t async for out in async_engine.generate(rid, prompt, greedy(8)) for t in out.new_token_ids]

        async def bad() -> None:
            with pytest.raises(InvalidRequest, match="temperature"):
                async for _ in async_engine.generate("bad", [1, 2], SamplingParams(temperature=-1)):
                    pass

        results = await asyncio.gather(collect("x", [1, 2, 3]), bad(), collect("y", [9, 8, 7, 6]))
        assert len(results[0]) == 8 and len(results[2]) == 8
        sync_expected = results[0]
    finally:
        async_engine.shutdown()
    again = make_engine(tiny_llama, num_blocks=64)
    again.add_request("x", [1, 2, 3], greedy(8))
    assert run_to_completion(again)["x"] == sync_expected


async def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks(tiny_llama: Path) -> None:
    async_engine = AsyncEngine(make_engine(tiny_llama, num_blocks=64))
    try:
        stream = async_engine.generate("long", list(range(20)), greedy(200))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            stats = await async_engine.stats()
            if stats.num_free_blocks == stats.num_blocks and stats.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
    finally:
        async_engine.shutdown()


def test_reservations_leave_a_watermark_for_running_requests_to_grow(engine) -> None:
    # 64 blocks, 10% watermark: while anything else holds blocks, reservations stop 6 blocks short.
    engine.add_request("running", [1, 2, 3], greedy(4))
    engine.step()
    held = engine.stats().num_blocks - engine.stats().num_free_blocks
    with pytest.raises(OutOfBlocks, match="would leave fewer than 6"):
        engine.reserve("big", (64 - held - 5) * 4)
    engine.reserve("fits", (64 - held - 6) * 4)
    engine.abort("fits")
    engine.abort("running")
    # An idle engine lends every block.
    assert len(engine.reserve("whole", 64 * 4)) == 64
    engine.abort("whole")


def test_a_prefill_only_request_hands_on_after_its_first_token(engine) -> None:
    engine.add_request("full", [5, 6, 7], greedy(6))
    first_of_full = run_to_completion(engine)["full"][0]
    total = engine.stats().num_blocks

    # 200 prompt tokens + 100 to generate would need 75 of the 64 blocks; handing on needs 51.
    engine.add_request("handed", [5, 6, 7], greedy(6), prefill_only=True)
    engine.add_request("long", [1] * 200, greedy(100), prefill_only=True)
    outs = [o for _ in range(50) for o in engine.step()]

    handed = next(o for o in outs if o.request_id == "handed")
    assert handed.finished and handed.finish_reason is None and handed.new_token_ids == [first_of_full]
    assert next(o for o in outs if o.request_id == "long").finish_reason is None
    assert not engine.has_work() and engine.stats().num_free_blocks == total

    engine.add_request("one", [5, 6, 7], greedy(1), prefill_only=True)  # the generation itself ends here
    assert engine.step()[0].finish_reason is FinishReason.LENGTH
