"""The decode step's host shortcuts change nothing a caller sees: block tables kept between steps
equal tables built afresh, and outputs whose text is decoded later (Engine.step_held) equal the
outputs of plain steps, token for token and character for character."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.block_tables import BlockTables
from engine.ids import RequestId
from engine.request import Request, RequestOutput
from engine.sampling_params import SamplingParams
from engine.uploader import Uploader
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion


def _request(i: int) -> Request:
    return Request(RequestId(f"r{i}"), [1, 2, 3], 3, SamplingParams(), seed=0)


def _fresh(requests: list[Request]) -> np.ndarray:
    width = max(1, *(len(r.block_ids) for r in requests))
    table = np.zeros((len(requests), width), dtype=np.int32)
    for i, r in enumerate(requests):
        table[i, : len(r.block_ids)] = r.block_ids
    return table


def test_block_tables_follow_growth_replacement_and_turnover() -> None:
    rng = random.Random(0)
    tables = BlockTables()
    live = [_request(i) for i in range(80)]  # more rows than the store starts with
    next_id = 80
    for _ in range(300):
        for r in live:
            roll = rng.random()
            if roll < 0.3:
                r.block_ids += [rng.randrange(1, 10_000) for _ in range(rng.choice((1, 1, 3)))]
            elif roll < 0.33:  # released and admitted again (preemption): another list, maybe as long
                r.block_ids = [rng.randrange(1, 10_000) for _ in range(len(r.block_ids))]
            elif roll < 0.35:
                r.block_ids = []
        if rng.random() < 0.2:  # requests finish and new ones come
            live = live[rng.randrange(1, 10) :] + [_request(next_id + k) for k in range(rng.randrange(1, 10))]
            next_id += 10
        batch = rng.sample(live, rng.randrange(1, len(live) + 1))
        table, width = tables.table(batch)
        assert width == max(1, *(len(r.block_ids) for r in batch))
        np.testing.assert_array_equal(table, _fresh(batch))


def _run(engine, held: bool, abort_at: int | None) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    pending = []

    def hand_over() -> None:
        while pending:
            for o in pending.pop().build():
                outs.setdefault(o.request_id, []).append(o)

    step = 0
    while engine.has_work():
        step += 1
        if step == abort_at:
            hand_over()
            engine.abort("b")
        if held:
            pending.append(engine.step_held(while_device_runs=hand_over))
        else:
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o)
    hand_over()
    return outs


@pytest.mark.parametrize("abort_at", [None, 7])
def test_held_outputs_equal_plain_steps(tiny_llama: Path, abort_at: int | None) -> None:
    """Plain requests (text owed), one with a stop string and one with a stop token (text now),
    one aborted mid-stream (its owed text still decoded in order)."""
    params = {
        "a": SamplingParams(max_tokens=12, ignore_eos=True),
        "b": SamplingParams(max_tokens=20, ignore_eos=True),
        "c": SamplingParams(max_tokens=16, ignore_eos=True, stop=("e",)),
        "d": SamplingParams(max_tokens=16, temperature=0.8, seed=3, logprobs=True),
    }
    prompts = {rid: [(7 * i + j) % 250 + 1 for j in range(5 + i)] for i, rid in enumerate(params)}
    runs = []
    for held in (False, True):
        engine = make_engine(tiny_llama)
        for rid, p in params.items():
            engine.add_request(rid, prompts[rid], p)
        runs.append(_run(engine, held, abort_at))
        assert not engine.requests and engine.pool.num_free == engine.pool.num_blocks
    plain, held_run = runs
    assert plain.keys() == held_run.keys()
    for rid in plain:
        assert [_fields(o) for o in plain[rid]] == [_fields(o) for o in held_run[rid]], rid
    assert "".join(o.text_delta for o in held_run["a"])  # the byte tokenizer gives text


def _fields(o: RequestOutput) -> tuple[object, ...]:
    return (o.new_token_ids, o.new_logprobs, o.text_delta, o.finished, o.finish_reason, o.num_output_tokens,
            o.num_prompt_tokens, o.num_cached_tokens, o.stop)  # fmt: skip


def test_one_staged_upload_gives_each_array_back() -> None:
    """The packing the GPU path uses (one staging buffer, one copy, views of it), run on CPU."""
    upload = Uploader(torch.device("cpu"), stage=True)
    for n in (0, 1, 3, 64, 20_000):  # 20,000 int64s outgrow the first staging buffer
        ids = np.arange(n, dtype=np.int64) * 7 - 3
        table = (np.arange(n * 5, dtype=np.int32).reshape(n, 5) + 11) if n else np.zeros((0, 1), dtype=np.int32)
        lens = np.arange(n, dtype=np.int32) + 1
        got = upload(ids, table, lens)
        for want, tensor in zip((ids, table, lens), got, strict=True):
            assert tensor.dtype == torch.from_numpy(want).dtype and tuple(tensor.shape) == want.shape
            np.testing.assert_array_equal(tensor.numpy(), want)


def test_staged_inputs_decode_as_plain_ones(tiny_llama: Path) -> None:
    """The GPU's one staged copy (views of one buffer for ids, positions, slots, the block table and
    lengths) carried through the model on CPU: the same tokens as unstaged inputs, decodes and
    prompt chunks mixed in one batch."""
    runs = []
    for staged in (False, True):
        engine = make_engine(tiny_llama, max_batched_tokens=16, max_prefill_chunk=16)
        if staged:
            engine.runner.upload = Uploader(torch.device("cpu"), stage=True)
        for i in range(6):
            engine.add_request(f"r{i}", [(5 * i + j) % 250 + 1 for j in range(3 + 7 * i)], greedy(10))
        runs.append(run_to_completion(engine))
    assert runs[0] == runs[1] and all(len(t) == 10 for t in runs[0].values())


async def _read(engine: AsyncEngine, rid: str, prompt: list[int], p: SamplingParams, keep: int) -> list[RequestOutput]:
    outs = []
    async for o in engine.generate(rid, prompt, p):
        outs.append(o)
        if len(outs) == keep:  # the reader leaves: the request is aborted between steps
            break
    return outs


async def test_the_async_engine_holding_outputs_gives_each_caller_what_plain_steps_give(tiny_llama: Path) -> None:
    """The GPU's way (outputs handed over, their texts decoded, while the next step runs) on CPU,
    through the async engine's callers: a pool so small that requests are preempted and recomputed,
    stop strings, stop tokens, logprobs, sampling, and readers that leave early. Each caller's
    tokens, text, logprobs and finish equal a plain engine's, and nothing stays held."""
    params, prompts = {}, {}
    for i in range(12):
        extra: dict[str, object] = {"stop": ("e",)} if i % 4 == 1 else {}
        if i % 5 == 2:
            extra.update(temperature=0.8, seed=i)
        params[f"r{i}"] = SamplingParams(max_tokens=6 + 3 * i, ignore_eos=i % 3 != 0, logprobs=i % 2 == 0, **extra)
        prompts[f"r{i}"] = [(7 * i + j) % 250 + 1 for j in range(5 + 3 * i)]
    keep = {"r3": 2, "r8": 5}  # left early
    plain = make_engine(tiny_llama, num_blocks=24, max_batched_tokens=16, max_prefill_chunk=16)
    for rid, p in params.items():
        plain.add_request(rid, prompts[rid], p)
    want: dict[str, list[RequestOutput]] = {}
    for _ in range(2_000):
        for o in plain.step():
            want.setdefault(o.request_id, []).append(o)
    assert not plain.has_work()
    held = make_engine(tiny_llama, num_blocks=24, max_batched_tokens=16, max_prefill_chunk=16)
    engine = AsyncEngine(held, hold_outputs=True)
    try:
        reads = (_read(engine, r, prompts[r], p, keep.get(r, 0)) for r, p in params.items())
        got = await asyncio.wait_for(asyncio.gather(*reads), 120)
        await engine.stats()  # the leavers' aborts ran before it
    finally:
        engine.shutdown()
    assert held.stats().num_preemptions > 0
    assert not held.requests and held.pool.num_free == held.pool.num_blocks
    for rid, outs in zip(params, got, strict=True):
        ref = want[rid]
        if rid in keep:  # what it read is the plain run's first tokens
            ref = [o for o in ref if o.num_output_tokens <= outs[-1].num_output_tokens]
        assert [t for o in outs for t in o.new_token_ids] == [t for o in ref for t in o.new_token_ids], rid
        assert "".join(o.text_delta for o in outs) == "".join(o.text_delta for o in ref), rid
        assert [x for o in outs for x in o.new_logprobs or []] == pytest.approx(
            [x for o in ref for x in o.new_logprobs or []], abs=1e-4  # other batches: other float sums
        ), rid
        assert [_end(o) for o in outs if o.finished] == [_end(o) for o in ref if o.finished], rid


def _end(o: RequestOutput) -> tuple[object, ...]:
    return (o.finish_reason, o.stop, o.num_output_tokens, o.num_prompt_tokens, o.num_cached_tokens)
