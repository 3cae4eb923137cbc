"""Priorities in the batcher: a higher-priority request is scheduled before lower ones, waiting or
running, so a low-priority prompt never delays a higher one's first token; equal priorities keep
arrival order."""

from __future__ import annotations

from engine.batcher import Batcher
from engine.block_pool import BlockPool
from engine.config import BatcherConfig
from engine.ids import RequestId
from engine.kv_manager import KVManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BLOCK = 16


def batcher(budget: int = 64, blocks: int = 256) -> Batcher:
    kv = KVManager(BlockPool(blocks), BLOCK, "fp", prefix_caching=False)
    return Batcher(BatcherConfig(max_running=8, max_batched_tokens=budget, max_prefill_chunk=budget), kv)


def request(name: str, prompt_tokens: int, priority: int) -> Request:
    tokens = list(range(1, prompt_tokens + 1))
    return Request(RequestId(name), tokens, prompt_tokens, SamplingParams(max_tokens=4), seed=0, priority=priority)


def step(b: Batcher) -> list[tuple[str, int]]:
    """Schedule one step and pretend it ran: computed counts advance and a request whose tokens all
    have KV gets its next token. Returns the chunks, by request."""
    plan = b.schedule()
    for chunk in plan.chunks:
        chunk.request.num_computed_tokens += chunk.num_new_tokens
        if chunk.request.num_computed_tokens == chunk.request.num_tokens:
            chunk.request.token_ids.append(7)
    return [(c.request.request_id, c.num_new_tokens) for c in plan.chunks]


def test_waiting_requests_are_admitted_highest_priority_first_then_in_arrival_order() -> None:
    b = batcher(budget=96)
    for name, priority in (("low", 0), ("normal-1", 1), ("high", 2), ("normal-2", 1)):
        b.add(request(name, 32, priority))

    assert step(b) == [("high", 32), ("normal-1", 32), ("normal-2", 32)]
    assert [r.request_id for r in b.waiting] == ["low"]


def test_a_running_low_priority_prompt_yields_the_budget_to_a_high_priority_one() -> None:
    b = batcher(budget=64)
    b.add(request("long-low", 640, 0))
    assert step(b) == [("long-low", 64)]  # the budget is all its own while it is alone

    b.add(request("urgent", 48, 2))

    assert step(b) == [("urgent", 48), ("long-low", 16)]  # the urgent prompt completes in one step


def test_a_preempted_request_waits_first_among_its_priority_but_behind_higher_ones() -> None:
    b = batcher(budget=64, blocks=4)  # 64 tokens of KV in all
    b.add(request("normal-b", 32, 1))
    b.add(request("normal-c", 32, 1))
    assert step(b) == [("normal-b", 32), ("normal-c", 32)]  # every block taken
    b.add(request("normal-a", 16, 1))
    b.add(request("high", 16, 2))

    # Each needs a third block for its next token: the most recent, normal-c, is preempted.
    assert step(b) == [("normal-b", 1)]

    assert [r.request_id for r in b.waiting] == ["high", "normal-c", "normal-a"]
