"""Soak: many requests through a live, supervised mesh of real processes (1 prefill + 2 decode
workers, the tiny model), with random client cancels, random deadlines and two worker kills
(SIGKILL prefill-0 a third of the way, decode-0 two thirds of the way; the supervisor restarts
them). Every request must end one of the ways a client can rely on:
- complete, with exactly the tokens the single-process engine generates (greedy);
- cancelled by the client itself;
- a clear status: DEADLINE_EXCEEDED (its deadline), UNAVAILABLE or RESOURCE_EXHAUSTED with a
  message naming what to do — never INTERNAL, UNKNOWN, a wrong token or a hang.
Afterwards nothing is stranded: every worker reports all its KV blocks free, no reservation, no
transfer and no request, and the scheduler has nothing queued or running.

`make soak` runs 10,000 requests (`--soak-requests`); `make test` runs a short one.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pdmesh.client import AsyncClient, ClusterState, FinishReason
from pdmesh.supervisor import RestartPolicy
from pdmesh.up import Mesh, MeshSpec
from tests.mesh.conftest import BLOCK_SIZE, KV_BLOCKS, engine_greedy, free_port_base

pytestmark = [pytest.mark.slow, pytest.mark.soak]

MAX_TOKENS = 24
CONCURRENCY = 32
CLEAR = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass(frozen=True)
class Plan:
    """What one request does: its prompt (an index into the pool), length, and how it may end."""

    prompt: int
    max_tokens: int
    cancel_after: int | None  # chunks, then the client cancels
    timeout_s: float | None  # its deadline


def plans(n: int, pool: int, rng: random.Random) -> list[Plan]:
    out = []
    for _ in range(n):
        roll = rng.random()
        cancel_after = rng.randrange(0, 4) if roll < 0.15 else None
        timeout_s = rng.uniform(0.02, 1.0) if 0.15 <= roll < 0.25 else None
        out.append(Plan(rng.randrange(pool), rng.randrange(1, MAX_TOKENS + 1), cancel_after, timeout_s))
    return out


async def run_one(client: AsyncClient, plan: Plan, prompt: list[int], expected: list[int]) -> str:
    """The outcome's name; raises AssertionError on anything a client could not rely on."""
    got: list[int] = []
    last_finish = None
    try:
        chunks = 0
        async for chunk in client.generate(
            prompt, max_tokens=plan.max_tokens, ignore_eos=True, timeout_s=plan.timeout_s or 120
        ):
            got += chunk.token_ids
            last_finish = chunk.finish_reason
            chunks += 1
            if plan.cancel_after is not None and chunks > plan.cancel_after:
                return "cancelled"
    except grpc.aio.AioRpcError as e:
        assert e.code() in CLEAR, f"{e.code().name}: {e.details()}"
        assert e.details(), f"{e.code().name} without a message"
        assert got == expected[: len(got)], "wrong tokens before the error"
        return e.code().name
    assert got == expected[: plan.max_tokens], f"wrong tokens: {got} != {expected[: plan.max_tokens]}"
    assert last_finish is FinishReason.LENGTH, last_finish
    return "complete"


async def settled(client: AsyncClient, timeout_s: float) -> ClusterState:
    """Until nothing is held anywhere; the last state seen either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = await client.cluster_state()
        idle = all(
            w.num_kv_blocks_free == w.num_kv_blocks_total and w.num_kv_reservations == 0
            and w.num_kv_transfers_in_flight == 0 and w.num_running_requests == 0 and w.num_waiting_requests == 0
            for w in state.workers
        )  # fmt: skip
        if (idle and state.num_queued_requests == 0 and state.num_running_requests == 0) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


def test_soak_many_requests_with_cancels_deadlines_and_two_worker_kills(
    mesh_model: Path, request: pytest.FixtureRequest
) -> None:
    n = int(request.config.getoption("--soak-requests"))
    rng = random.Random(14)
    pool = [[rng.randrange(1, 256) for _ in range(rng.randrange(4, 80))] for _ in range(24)]
    oracle = engine_greedy(mesh_model, pool, MAX_TOKENS)
    todo = plans(n, len(pool), rng)
    spec = MeshSpec(
        port=free_port_base(), prefill=1, decode=2, model=str(mesh_model),
        extra_worker_args=("--threads", "1", "--kv-blocks", str(KV_BLOCKS), "--block-size", str(BLOCK_SIZE)),
        env=(("PDMESH_SCHEDULER_REPORT_INTERVAL_MS", "100"), ("PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS", "16")),
    )  # fmt: skip
    mesh = Mesh(spec, RestartPolicy(restart=True))
    mesh.start(300)
    outcomes: collections.Counter[str] = collections.Counter()
    kills = {n // 3: "prefill-0", 2 * n // 3: "decode-0"}

    async def soak() -> ClusterState:
        started = time.monotonic()
        async with AsyncClient(mesh.target) as client:
            queue = iter(enumerate(todo))
            errors: list[str] = []

            async def worker() -> None:
                for i, plan in queue:
                    if i in kills:
                        await asyncio.to_thread(mesh.kill, kills[i])
                    one = run_one(client, plan, pool[plan.prompt], oracle[plan.prompt])
                    try:
                        outcomes[await asyncio.wait_for(one, 300)] += 1
                    except AssertionError as e:
                        errors.append(f"request {i} ({plan}): {e}")

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            elapsed = time.monotonic() - started
            print(f"\nsoak: {n} requests in {elapsed:.0f} s: {dict(outcomes)}")
            assert not errors, f"{len(errors)} requests ended badly; first: {errors[:5]}"
            return await settled(client, 60)

    try:
        state = asyncio.run(soak())
    finally:
        mesh.stop()
    assert sum(outcomes.values()) == n
    assert outcomes["complete"] > n // 2
    for w in state.workers:
        assert (w.num_kv_blocks_free, w.num_kv_reservations, w.num_kv_transfers_in_flight) == (
            w.num_kv_blocks_total, 0, 0,
        ), w  # fmt: skip
        assert (w.num_running_requests, w.num_waiting_requests) == (0, 0), w
    assert (state.num_queued_requests, state.num_running_requests) == (0, 0)
    restarted = mesh.supervisor.children
    assert restarted["prefill-0"].restarts >= 1 and restarted["decode-0"].restarts >= 1
