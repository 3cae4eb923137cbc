"""A scheduler told to stop drains its streams: they finish within the grace period or, when they
would outlast it, end with a last chunk whose finish reason is ABORT (usage included, status OK),
never a cut stream; what they held on the workers is cancelled and released."""

from __future__ import annotations

import asyncio
import os
import signal

from scheduler_mesh import MeshFactory, eventually
from scripted_workers import expected_tokens

from pdmesh.client import Chunk, FinishReason


async def test_a_stream_outlasting_the_grace_ends_with_an_abort_chunk(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1)  # the test mesh's grace is 0.2 s
    decode = mesh.decode_servicer()
    decode.token_delay_s = 0.05
    chunks: list[Chunk] = []

    async for chunk in mesh.client.generate([1, 2, 3], max_tokens=500, seed=4):
        chunks.append(chunk)
        if len(chunks) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's serve() drains on it

    last = chunks[-1]
    assert last.finish_reason is FinishReason.ABORT
    assert last.usage is not None and last.usage.completion_tokens == len(chunks) - 1
    tokens = [t for c in chunks for t in c.token_ids]
    assert 3 <= len(tokens) < 500
    assert tokens == expected_tokens(4, 3, 500)[: len(tokens)]
    await eventually(decode.cancelled.is_set, what="the decode worker's stream to be cancelled")


async def test_a_request_still_in_prefill_ends_with_an_abort_chunk_and_its_ticket_released(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    prefill, decode = mesh.prefill_servicer(), mesh.decode_servicer()
    prefill.hang = True

    async def consume() -> list[Chunk]:
        return [c async for c in mesh.client.generate(list(range(1, 101)), max_tokens=5, seed=2)]

    stream = asyncio.ensure_future(consume())
    await asyncio.wait_for(prefill.started.wait(), 5)
    os.kill(os.getpid(), signal.SIGTERM)
    chunks = await asyncio.wait_for(stream, 5)

    assert [(c.token_ids, c.finish_reason) for c in chunks] == [((), FinishReason.ABORT)]
    await eventually(prefill.cancelled.is_set, what="the prefill call to be cancelled")
    await eventually(lambda: not decode.held, what="the ticket to be released")
    assert decode.releases == [f"{decode.worker_id}/t1"]
