"""A decode worker whose device is lost mid-stream: it stops serving, the stream moves to the other
decode worker and completes exactly, and the broken worker exits non-zero for its supervisor.

The loss is injected through configuration (PDMESH_ENGINE_INJECT_DEVICE_LOSS_AT_STEP): the
engine's step fails as a lost device makes it fail, and everything after — the engine's verdict,
the failed requests, the worker's shutdown and exit, the scheduler's failover — is the real path.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pdmesh.cli import EX_TEMPFAIL
from pdmesh.client import AsyncClient, Chunk
from tests.mesh.conftest import engine_greedy, start_mesh, stop_mesh
from tests.mesh.test_mesh import prompts_of

pytestmark = pytest.mark.slow

LOSS_AT_STEP = 40  # every worker's engine fails its 40th step
MAX_TOKENS = 70  # the first decode worker streams ~40 tokens; the second needs ~30 steps, fewer than 40


def test_a_lost_device_stops_the_worker_and_its_stream_completes_on_the_other(mesh_model: Path) -> None:
    mesh = start_mesh(mesh_model, 1, 2, env={"PDMESH_ENGINE_INJECT_DEVICE_LOSS_AT_STEP": str(LOSS_AT_STEP)})
    try:
        prompt = prompts_of([60], seed=9)[0]
        expected = engine_greedy(mesh_model, [prompt], MAX_TOKENS)[0]

        async def run() -> tuple[list[Chunk], dict[str, str]]:
            async with AsyncClient(mesh.target) as client:
                chunks = [c async for c in client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True)]
                state = await client.cluster_state()
                return chunks, {w.worker_id: w.health.name for w in state.workers if w.health is not None}

        chunks, health = asyncio.run(asyncio.wait_for(run(), 120))
        placement = chunks[-1].placement
        assert placement is not None and placement.num_decode_failovers == 1
        assert [t for c in chunks for t in c.token_ids] == expected
        broken = next(w for w in ("decode-0", "decode-1") if w != placement.decode_worker_id)
        assert health[broken] != "SERVING" and health[placement.decode_worker_id] == "SERVING"
        process = mesh.procs[broken]
        assert process is not None and process.wait(timeout=60) == EX_TEMPFAIL
    finally:
        stop_mesh(mesh)
