"""A fresh mesh's prefill worker connects to its decode worker and the KV store before any request
(the scheduler names them in its answers to load reports): the first hand-off dials nothing, and a
decode worker that is killed and restarted gets a new connection in place of the old one. Observed
on the prefill worker's /metrics, as an operator would."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.client import AsyncClient, Chunk
from pdmesh.up import Mesh
from tests.mesh.conftest import engine_greedy, start_mesh, stop_mesh
from tests.mesh.test_mesh import prompts_of

pytestmark = pytest.mark.slow


def kv_connections(mesh: Mesh, process: str = "prefill-0") -> dict[str, float]:
    """The process's KV connection metrics: connections open now, dials, preconnects."""
    n = dict(mesh.spec.metrics_ports())[process]
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.spec.port + 200 + n}/metrics", timeout=10).read().decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    names = {"open": "pdmesh:worker_kv_peer_connections", "dials": "pdmesh:worker_kv_dials_total",
             "preconnects": "pdmesh:worker_kv_preconnects_total"}  # fmt: skip
    return {key: samples[name] for key, name in names.items()}


def eventually(check: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        time.sleep(0.1)


def generate(mesh: Mesh, prompt: list[int], max_tokens: int) -> tuple[list[int], Chunk]:
    async def run() -> list[Chunk]:
        async with AsyncClient(mesh.target) as client:
            return [c async for c in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True)]

    chunks = asyncio.run(asyncio.wait_for(run(), 120))
    return [t for c in chunks for t in c.token_ids], chunks[-1]


def test_the_prefill_worker_is_connected_before_the_first_request_and_again_after_a_decode_restart(
    mesh_model: Path,
) -> None:
    mesh = start_mesh(mesh_model, 1, 1, env={"PDMESH_SCHEDULER_POLICY": "least_loaded"})
    try:
        prompts = prompts_of([200, 220], seed=21)
        expected = engine_greedy(mesh_model, prompts, 6)
        # the decode worker's listener and the store's, before any request
        warm = {"open": 2, "dials": 2, "preconnects": 2}
        eventually(lambda: kv_connections(mesh) == warm, 60, "two warm connections")

        tokens, last = generate(mesh, prompts[0], 6)
        assert tokens == expected[0]
        assert last.placement is not None and last.placement.prefill_worker_id == "prefill-0"
        assert kv_connections(mesh)["dials"] == 2  # the hand-off went over the connection already open

        mesh.kill("decode-0")
        mesh.restart("decode-0", timeout_s=120)
        # the old connection is gone (UCX saw the peer die) and the restarted worker got a new one
        eventually(lambda: kv_connections(mesh)["dials"] == 3, 60, "a connection to the restarted decode worker")
        assert kv_connections(mesh)["open"] == 2
        tokens, last = generate(mesh, prompts[1], 6)
        assert tokens == expected[1]
        assert last.placement is not None and last.placement.prefill_worker_id == "prefill-0"
        assert kv_connections(mesh)["dials"] == 3
    finally:
        stop_mesh(mesh)
