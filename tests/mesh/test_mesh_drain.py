"""A worker told to stop (SIGTERM) drains: the scheduler sees it DRAINING at once and places no
new request on it, while the stream it is serving runs to its end; then it exits cleanly. A
scheduler told to stop ends a stream that would outlast its grace with an ABORT chunk."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from pdmesh.client import AsyncClient, Chunk, ClusterState, FinishReason, WorkerHealth
from tests.mesh.conftest import engine_greedy, start_mesh, stop_mesh
from tests.mesh.test_mesh import prompts_of

pytestmark = pytest.mark.slow


async def until(client: AsyncClient, check, timeout_s: float = 30.0) -> ClusterState:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        state = await client.cluster_state()
        if check(state):
            return state
        assert time.monotonic() < deadline, f"cluster never reached the state: {state}"
        await asyncio.sleep(0.05)


def test_a_draining_worker_takes_no_new_requests_and_finishes_its_stream(mesh_model: Path) -> None:
    # A grace period no busy machine outlasts: the stream must end by itself, not be cut.
    mesh = start_mesh(mesh_model, 0, 2, env={"PDMESH_SERVER_SHUTDOWN_GRACE_S": "300"})
    prompt, short = prompts_of([20, 10], seed=8)
    expected = engine_greedy(mesh_model, [prompt], 1000)[0]

    async def run() -> tuple[list[int], list[str], str, WorkerHealth | None]:
        async with AsyncClient(mesh.target) as client:
            chunks: list[Chunk] = []

            async def consume() -> None:
                async for chunk in client.generate(prompt, max_tokens=1000, ignore_eos=True):
                    chunks.append(chunk)

            stream = asyncio.create_task(consume())
            busy = await until(client, lambda s: any(w.num_assigned_requests for w in s.workers))
            draining = next(w.worker_id for w in busy.workers if w.num_assigned_requests)
            mesh.procs[draining].send_signal(signal.SIGTERM)
            state = await until(client, lambda s: s.worker(draining).health is WorkerHealth.DRAINING)
            assert not stream.done(), "the stream ended before the worker was seen draining; make it longer"

            placed = []
            for _ in range(4):
                finished = [c async for c in client.generate(short, max_tokens=2)]
                assert finished[-1].placement is not None
                placed.append(finished[-1].placement.decode_worker_id)
            await asyncio.wait_for(stream, 120)
            assert chunks[-1].placement is not None
            return [t for c in chunks for t in c.token_ids], placed, draining, state.worker(draining).health

    try:
        tokens, placed, draining, health = asyncio.run(run())
        exit_code = mesh.procs[draining].wait(120)
    finally:
        stop_mesh(mesh)
    assert health is WorkerHealth.DRAINING
    assert draining not in placed and len(set(placed)) == 1
    assert tokens == expected  # its stream ran to the end on the draining worker
    assert exit_code == 0  # then it stopped cleanly


def test_a_stopping_mesh_ends_a_stream_outlasting_the_grace_with_an_abort_chunk(mesh_model: Path) -> None:
    """`pdmesh up`'s stop (the scheduler first, then the workers) with a 3 s grace and a stream that
    needs far longer: the client gets the tokens so far and a last chunk saying ABORT, status OK."""
    mesh = start_mesh(mesh_model, 0, 1, grace_s=3.0)
    [prompt] = prompts_of([20], seed=9)
    expected = engine_greedy(mesh_model, [prompt], 1900)[0]

    async def run() -> list[Chunk]:
        chunks: list[Chunk] = []
        async with AsyncClient(mesh.target) as client:
            async for chunk in client.generate(prompt, max_tokens=1900, ignore_eos=True):
                chunks.append(chunk)
                if len(chunks) == 5:
                    stopping.append(asyncio.ensure_future(asyncio.to_thread(mesh.stop)))
        return chunks

    stopping: list[asyncio.Future[None]] = []

    async def main() -> list[Chunk]:
        chunks = await run()
        await asyncio.wait_for(stopping[0], 120)
        return chunks

    try:
        chunks = asyncio.run(main())
    finally:
        stop_mesh(mesh)
    tokens = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].finish_reason is FinishReason.ABORT
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(tokens)
    assert 5 <= len(tokens) < 1900 and tokens == expected[: len(tokens)]
