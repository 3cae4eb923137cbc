"""A mesh whose workers stream every 4 tokens (`--stream-interval 4`): the client sees the first
token alone, at once, then chunks of at least 4, the last one carrying the finish; every token
there, in order; a stream left mid-interval frees its blocks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdmesh.client import AsyncClient, Chunk, FinishReason
from tests.mesh.conftest import engine_greedy, start_mesh, stop_mesh
from tests.mesh.test_mesh import all_free, prompts_of, settled

pytestmark = pytest.mark.slow

INTERVAL = 4


@pytest.fixture(scope="module")
def mesh(mesh_model: Path):
    m = start_mesh(mesh_model, 1, 1, "--stream-interval", str(INTERVAL), kvstore=False)
    yield m
    stop_mesh(m)


def test_chunks_of_the_interval_after_a_first_token_alone_carry_the_engines_greedy_tokens(
    mesh, mesh_model: Path
) -> None:
    prompts = prompts_of([5, 40, 90, 17], seed=11)
    expected = engine_greedy(mesh_model, prompts, 30)

    async def chunks_of(client: AsyncClient, prompt: list[int]) -> list[Chunk]:
        return [c async for c in client.generate(prompt, max_tokens=30, ignore_eos=True)]

    async def run() -> list[list[Chunk]]:
        async with AsyncClient(mesh.target) as client:
            return list(await asyncio.gather(*(chunks_of(client, p) for p in prompts)))

    for chunks, tokens in zip(asyncio.run(run()), expected, strict=True):
        sizes = [len(c.token_ids) for c in chunks if c.token_ids]
        assert sizes[0] == 1, sizes  # the first token, alone
        # A handed-off request's decode stream sends its first token alone too (its time is the
        # decode's first step); every chunk after carries 4 or more, the last whatever is left.
        assert sizes[1] == 1 or sizes[1] >= INTERVAL, sizes
        assert all(n >= INTERVAL for n in sizes[2:-1]), sizes
        assert [t for c in chunks for t in c.token_ids] == tokens
        last = chunks[-1]
        assert last.finish_reason is FinishReason.LENGTH and last.usage is not None
        assert last.usage.completion_tokens == 30


def test_a_stream_left_mid_interval_frees_its_blocks_on_both_workers(mesh) -> None:
    async def run() -> tuple[int, bool]:
        async with AsyncClient(mesh.target) as client:
            stream = client.generate(prompts_of([60], seed=5)[0], max_tokens=400, ignore_eos=True)
            received = 0
            async for chunk in stream:
                received += len(chunk.token_ids)
                if received > 1:
                    break
            await stream.aclose()
            return received, all_free(await settled(client))

    received, freed = asyncio.run(run())
    assert received < 400 and freed
