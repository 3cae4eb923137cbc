"""The real multi-process mesh on one GPU under concurrent load: 64 requests at once, with the KV
handed from a prefill worker to a decode worker over UCX (disaggregated) and with every prompt
prefilled where it is decoded (colocated). Zero failures, and each request's greedy tokens equal
its tokens when it ran alone through the same mesh.

Runs on the lent GPU machine only (marker gpu). float32, so that batching cannot flip a greedy
choice by rounding; the graphs, the Triton kernels and the transport are the production ones.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from pdmesh.client import AsyncClient, ExecutionPlan
from pdmesh.up import Mesh, MeshSpec
from tests.mesh.conftest import free_port_base
from tests.mesh.test_mesh import all_free, settled

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONCURRENT = 64
MAX_TOKENS = 24


def gpu_mesh(model: Path, *, colocated: bool) -> Mesh:
    # least_loaded: its fixed rule hands every long prompt off (slo would decide per request).
    env = [("PDMESH_SCHEDULER_REPORT_INTERVAL_MS", "100"), ("PDMESH_SCHEDULER_POLICY", "least_loaded")]
    if colocated:  # every prompt is "short enough" to prefill on its decode worker
        env.append(("PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS", "1000000"))
    spec = MeshSpec(
        port=free_port_base(), prefill=0 if colocated else 1, decode=1, model=str(model), device="cuda",
        extra_worker_args=("--dtype", "float32", "--kv-blocks", "4096", "--block-size", "16"), env=tuple(env),
        http_port=None,  # gRPC only: never the default 8000, which another mesh may hold
    )  # fmt: skip
    mesh = Mesh(spec)
    mesh.start(300)
    return mesh


def prompts(n: int) -> list[list[int]]:
    rng = random.Random(15)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(40, 600))] for _ in range(n)]


async def generate(client: AsyncClient, prompt: list[int]) -> tuple[list[int], ExecutionPlan | None]:
    tokens: list[int] = []
    plan = None
    async for chunk in client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True):
        tokens += chunk.token_ids
        if chunk.placement is not None:
            plan = chunk.placement.plan
    return tokens, plan


@pytest.mark.parametrize("colocated", [False, True], ids=["disaggregated", "colocated"])
def test_64_concurrent_requests_on_one_gpu_succeed_with_their_solo_tokens(mesh_model: Path, colocated: bool) -> None:
    mesh = gpu_mesh(mesh_model, colocated=colocated)
    try:
        batch = prompts(CONCURRENT)

        async def run() -> tuple[list[list[int]], list[tuple[list[int], ExecutionPlan | None] | BaseException]]:
            async with AsyncClient(mesh.target) as client:
                # Together first, on a cold cache: alone afterwards, prefix-cache hits on the decode
                # worker would turn the disaggregated plan into local prefills.
                together = await asyncio.gather(*(generate(client, p) for p in batch), return_exceptions=True)
                alone = [(await generate(client, p))[0] for p in batch]
                assert all_free(await settled(client, timeout_s=30))
                return alone, together

        alone, together = asyncio.run(asyncio.wait_for(run(), 600))
    finally:
        mesh.stop()
    failures = [r for r in together if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {CONCURRENT} failed, e.g. {failures[0]!r}"
    results = [r for r in together if not isinstance(r, BaseException)]
    assert all(len(tokens) == MAX_TOKENS for tokens, _ in results)
    assert [tokens for tokens, _ in results] == alone
    want = ExecutionPlan.LOCAL_PREFILL if colocated else ExecutionPlan.DISAGGREGATED
    assert Counter(plan for _, plan in results) == {want: CONCURRENT}
