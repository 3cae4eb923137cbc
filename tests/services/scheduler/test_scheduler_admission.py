"""Bounded work per request, as a client sees it: requests beyond the decode workers' batch slots
wait in the scheduler's queue (counted in num_queued_requests), highest priority first, for at most
the queue timeout, whichever plan they would run on; a full queue refuses at once; a prompt over
the byte limit is refused before it is tokenized, naming the field and the limit.

The scripted decode worker states 8 batch slots (max_num_running_requests)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from scheduler_mesh import Mesh, MeshFactory, eventually
from scripted_workers import expected_tokens

from pdmesh.client import Priority

SLOTS = 8


async def tokens(mesh: Mesh, max_tokens: int, seed: int, **options: object) -> list[int]:
    return [t async for c in mesh.client.generate([1, 2, 3], max_tokens=max_tokens, seed=seed, **options)
            for t in c.token_ids]  # fmt: skip


async def fill_slots(mesh: Mesh) -> list[asyncio.Future[list[int]]]:
    """SLOTS long streams, running on the decode worker."""
    mesh.decode_servicer().token_delay_s = 0.02
    running = [asyncio.ensure_future(tokens(mesh, 50, seed=s)) for s in range(SLOTS)]
    await eventually(lambda: mesh.decode_servicer().running == SLOTS, what="every slot to be taken")
    return running


async def queued(mesh: Mesh) -> int:
    return (await mesh.cluster()).num_queued_requests


async def test_a_request_beyond_the_slots_waits_counted_and_runs_when_one_frees(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1)
    running = await fill_slots(mesh)

    waiting = asyncio.ensure_future(tokens(mesh, 3, seed=99))
    deadline = time.monotonic() + 5
    while await queued(mesh) != 1:
        assert time.monotonic() < deadline, "the ninth request was never counted as queued"
        await asyncio.sleep(0.01)
    assert mesh.decode_servicer().running == SLOTS  # it waits here, not in the worker

    assert await asyncio.wait_for(waiting, 10) == expected_tokens(99, 3, 3)
    assert [await r for r in running] == [expected_tokens(s, 3, 50) for s in range(SLOTS)]
    assert await queued(mesh) == 0


async def test_the_queue_timeout_holds_for_a_decode_workers_own_prefill(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1, queue_timeout_ms=300)  # every plan is LOCAL_PREFILL
    running = await fill_slots(mesh)

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tokens(mesh, 3, seed=1)
    waited = time.monotonic() - started

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue_timeout_ms: waited 300 ms for a decode slot" in (refused.value.details() or "")
    assert waited >= 0.3
    await asyncio.gather(*running)


async def test_a_full_queue_refuses_at_once(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1, max_queued_requests=2)
    running = await fill_slots(mesh)
    waiting = [asyncio.ensure_future(tokens(mesh, 2, seed=s)) for s in (50, 51)]
    await eventually_queued(mesh, 2)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await tokens(mesh, 2, seed=52)

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.value.details() or "").startswith("queue: 2 requests are already waiting")
    assert await asyncio.gather(*waiting) == [expected_tokens(s, 3, 2) for s in (50, 51)]
    await asyncio.gather(*running)


async def test_a_high_priority_request_is_let_in_before_a_low_one_that_came_first(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1)
    running = await fill_slots(mesh)
    order: list[str] = []

    async def request(name: str, priority: Priority) -> None:
        await tokens(mesh, 1, seed=7, priority=priority)
        order.append(name)

    low = asyncio.ensure_future(request("low", Priority.LOW))
    await eventually_queued(mesh, 1)
    high = asyncio.ensure_future(request("high", Priority.HIGH))
    await eventually_queued(mesh, 2)
    running[0].cancel()  # one slot frees: the high one takes it
    await asyncio.wait_for(high, 10)
    assert order == ["high"]
    await asyncio.wait_for(low, 10)
    await asyncio.gather(*running[1:])


async def eventually_queued(mesh: Mesh, n: int) -> None:
    deadline = time.monotonic() + 5
    while await queued(mesh) != n:
        assert time.monotonic() < deadline, f"never {n} queued"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        ("x" * 101, "prompt.text"),
        ("é" * 51, "prompt.text"),  # 51 characters, 102 bytes
        ([{"role": "user", "content": "y" * 60}, {"role": "user", "content": "z" * 41}], "prompt.chat.messages"),
    ],
)
async def test_a_prompt_over_the_byte_limit_is_invalid_naming_the_field_and_the_limit(
    mesh_factory: MeshFactory, prompt: object, field: str
) -> None:
    mesh = await mesh_factory(prefill=0, decode=1, max_prompt_bytes=100)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.client.complete(prompt, max_tokens=2)  # type: ignore[arg-type]

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith(f"{field}: is ") and "limit of 100 (max_prompt_bytes)" in details
    assert mesh.decode_servicer().generates == []
    assert await mesh.client.complete("x" * 100, max_tokens=2)  # at the limit: served


async def test_the_queue_timeout_is_one_budget_for_a_decode_slot_and_then_kv_blocks(mesh_factory: MeshFactory) -> None:
    # The slots are taken for about 2 s (50 tokens 40 ms apart); then the decode cache is full.
    # A handed-off request waits for a slot, then for blocks: 3 s in all, not 3 s more after the slot.
    mesh = await mesh_factory(prefill=1, decode=1, queue_timeout_ms=3000)
    running = await fill_slots(mesh)
    mesh.decode_servicer().token_delay_s = 0.04
    mesh.decode_servicer().full = True  # Reserve refuses: the hand-off waits for blocks

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.client.complete(list(range(1, 101)), max_tokens=2)  # 100 tokens: handed off
    waited = time.monotonic() - started

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Reserve gives up when its next pause (at most 250 ms) would pass the budget; two budgets
    # would have taken about 5 s.
    assert 2.7 <= waited < 4.5, waited
    await asyncio.gather(*running)
