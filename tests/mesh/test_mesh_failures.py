"""Workers killed with SIGKILL in the middle of a request: the client still gets every token,
exactly the tokens of an undisturbed run, and no block stays held."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from pdmesh.client import AsyncClient, Chunk
from tests.mesh.conftest import engine_greedy
from tests.mesh.test_mesh import all_free, prompts_of, settled

pytestmark = pytest.mark.slow


def test_prefill_worker_killed_mid_push_the_request_completes_correctly(mesh_factory, mesh_model: Path) -> None:
    # A slow prefill: 2,000 prompt tokens in chunks of 4 on the prefill worker (~500 steps). Under
    # least_loaded it is handed off for sure (slo would prefill it on the idle decode worker).
    mesh = mesh_factory(mesh_model, 1, 1, "--max-batched-tokens", "4", env={"PDMESH_SCHEDULER_POLICY": "least_loaded"})
    prompt = prompts_of([2000], seed=11)[0]
    expected = engine_greedy(mesh_model, [prompt], 8)[0]

    async def run() -> tuple[list[int], list[Chunk]]:
        async with AsyncClient(mesh.target) as client:
            chunks: list[Chunk] = []

            async def consume() -> None:
                async for chunk in client.generate(prompt, max_tokens=8, ignore_eos=True):
                    chunks.append(chunk)

            task = asyncio.create_task(consume())
            while True:  # until the decode worker holds the reservation: the prefill is under way
                state = await client.cluster_state()
                if any(w.num_kv_reservations for w in state.workers):
                    break
                await asyncio.sleep(0.05)
            assert not chunks, "the prefill finished before the kill; slow it down"
            mesh.kill("prefill-0")
            await asyncio.wait_for(task, 120)
            state = await settled(client)
            decode = [w for w in state.workers if w.role is not None and w.role.name == "DECODE"]
            assert all_free(dataclasses.replace(state, workers=tuple(decode)))
            return [t for c in chunks for t in c.token_ids], chunks

    tokens, chunks = asyncio.run(run())
    assert tokens == expected
    assert chunks[-1].placement is not None

    # Started again with its own command line, the prefill worker takes disaggregated work again
    # (a fresh prompt: the first one is cached on the decode worker now, so it would stay local).
    mesh.restart("prefill-0", timeout_s=120)
    fresh = prompts_of([200], seed=12)[0]

    async def after_restart() -> Chunk:
        async with AsyncClient(mesh.target) as client:
            return [c async for c in client.generate(fresh, max_tokens=2, ignore_eos=True)][-1]

    last = asyncio.run(asyncio.wait_for(after_restart(), 120))
    assert last.placement is not None and last.placement.prefill_worker_id == "prefill-0"


def test_decode_worker_killed_mid_stream_the_stream_continues_identically(mesh_factory, mesh_model: Path) -> None:
    mesh = mesh_factory(mesh_model, 1, 2)
    prompt = prompts_of([60], seed=5)[0]
    expected = engine_greedy(mesh_model, [prompt], 1000)[0]

    async def run() -> tuple[list[int], Chunk]:
        async with AsyncClient(mesh.target) as client:
            tokens: list[int] = []
            last: Chunk | None = None
            killed = False
            async for chunk in client.generate(prompt, max_tokens=1000, ignore_eos=True):
                tokens += chunk.token_ids
                last = chunk
                # Early, and by the scheduler's own count rather than a load report up to 100 ms old:
                # on a quiet machine the tiny model generates hundreds of tokens before the client
                # has read 20 of them, and could finish before a late kill lands.
                if not killed and len(tokens) >= 2:
                    state = await client.cluster_state()
                    busy = [w for w in state.workers
                            if w.num_assigned_requests > 0 and w.role is not None and w.role.name == "DECODE"]
                    if busy:
                        mesh.kill(busy[0].worker_id)
                        killed = True
            assert killed, "never saw the decode worker busy"
            assert last is not None
            return tokens, last

    deadline = time.monotonic() + 180
    tokens, last = asyncio.run(asyncio.wait_for(run(), deadline - time.monotonic()))
    assert tokens == expected
    assert last.placement is not None and last.placement.num_decode_failovers == 1

