"""The `slo` policy on a real mesh (scheduler, prefill and decode workers as processes): once the
decode worker's KV is spoken for, a request that could only start after a running one leaves,
later than its TTFT target, is refused at once with RESOURCE_EXHAUSTED and a RetryInfo saying
when to come back, and costs no worker anything; the admitted ones stream on untouched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from pdmesh.client import AsyncClient, Chunk, ClusterState, WorkerRole, retry_after_s
from services.scheduler.predictor import CALIBRATED_AFTER_SAMPLES
from tests.mesh.conftest import BLOCK_SIZE, start_mesh, stop_mesh
from tests.mesh.test_mesh import prompts_of

pytestmark = pytest.mark.slow

# Each request holds KV for prompt + max_tokens on its decode worker: 40 + 2,000 tokens. The decode
# worker's cache (kv_blocks x BLOCK_SIZE = 4,800 tokens, 10% kept free) holds two of them, not three.
KV_BLOCKS = 1200
MAX_TOKENS = 2000
TTFT_MS = 500  # the third could start only after ~2,000 decode steps of another (each well over 0.25 ms)


async def calibrated(client: AsyncClient) -> ClusterState:
    """Until the scheduler's step model of the decode worker has seen enough of its decode steps
    to count as calibrated (before that its forecasts refuse nothing)."""
    deadline = time.monotonic() + 60
    while True:
        await client.complete(prompts_of([8], seed=3)[0], max_tokens=16, ignore_eos=True)
        state = await client.cluster_state()
        decode = [w for w in state.workers if w.role is WorkerRole.DECODE]
        models = [w.step_model for w in decode]
        # A decode step's predicted time is positive (which term carries it is the fit's business).
        step = [m.fixed_ms + m.per_decode_request_ms + m.per_decode_context_token_ms for m in models]
        if models and all(m.num_samples >= CALIBRATED_AFTER_SAMPLES for m in models) and min(step) > 0:
            return state
        assert time.monotonic() < deadline, f"the decode worker's step model never calibrated: {decode}"
        await asyncio.sleep(0.1)


def test_a_mesh_whose_decode_kv_is_spoken_for_refuses_at_once_with_a_retry_hint(mesh_model: Path) -> None:
    mesh = start_mesh(
        mesh_model, 1, 1, "--kv-blocks", str(KV_BLOCKS),
        env={"PDMESH_SCHEDULER_POLICY": "slo", "PDMESH_SLO_DEFAULT_TTFT_MS": str(TTFT_MS)},
    )  # fmt: skip
    first, second, third = prompts_of([40, 40, 40], seed=5)

    async def run() -> tuple[grpc.aio.AioRpcError, float, list[int]]:
        async with AsyncClient(mesh.target) as client:
            await calibrated(client)
            streams = [client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True) for p in (first, second)]
            heads: list[Chunk] = [await anext(s) for s in streams]  # both admitted and decoding
            assert all(h.token_ids for h in heads)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.complete(third, max_tokens=MAX_TOKENS, ignore_eos=True)
            took = time.monotonic() - started
            lengths = []
            for head, stream in zip(heads, streams, strict=True):
                lengths.append(len(head.token_ids) + sum([len(c.token_ids) async for c in stream]))
            return refused.value, took, lengths

    try:
        refused, took, lengths = asyncio.run(run())
    finally:
        stop_mesh(mesh)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no plan meets the request's SLO now" in (refused.details() or "")
    assert took < 5.0  # at once: not after queueing for a running request to leave
    hint = retry_after_s(refused)
    assert hint is not None and hint > 0.05  # when the first running request is predicted to leave
    assert lengths == [MAX_TOKENS, MAX_TOKENS]  # the admitted ones ran to the end
    assert KV_BLOCKS * BLOCK_SIZE * 0.9 < 3 * (40 + MAX_TOKENS)  # the premise: two fit, three do not
