"""A mesh whose every gRPC hop requires mutual TLS: client -> scheduler, scheduler -> prefill and
decode workers, workers -> the scheduler's registry. Each process serves with its certificate and
calls with the client certificate, all from PDMESH_SERVER_* and PDMESH_CHANNEL_* settings."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest

from pdmesh.client import AsyncClient, ExecutionPlan
from pdmesh.config import ChannelConfig
from tests.certs import make_certs
from tests.mesh.conftest import engine_greedy, start_mesh, stop_mesh
from tests.mesh.test_mesh import prompts_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates"),
]


def test_a_mesh_with_mtls_on_every_hop_serves_a_handed_off_request(
    mesh_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = make_certs(tmp_path)
    calling = {
        "PDMESH_CHANNEL_TLS_CA_PATH": str(certs["ca.pem"]),
        "PDMESH_CHANNEL_TLS_CERT_PATH": str(certs["client.pem"]),
        "PDMESH_CHANNEL_TLS_KEY_PATH": str(certs["client.key"]),
    }
    serving = {
        "PDMESH_SERVER_TLS_CERT_PATH": str(certs["server.pem"]),
        "PDMESH_SERVER_TLS_KEY_PATH": str(certs["server.key"]),
        "PDMESH_SERVER_TLS_CA_PATH": str(certs["ca.pem"]),  # client certificates required
    }
    for name, value in calling.items():  # this process's clients (the mesh's readiness check too)
        monkeypatch.setenv(name, value)
    # least_loaded hands a long prompt off for sure (slo would prefill it on the idle decode worker).
    mesh = start_mesh(mesh_model, 1, 1, env={**calling, **serving, "PDMESH_SCHEDULER_POLICY": "least_loaded"})
    prompt = prompts_of([120], seed=21)[0]  # long enough to be handed off

    async def run() -> tuple[list[int], ExecutionPlan | None, grpc.StatusCode]:
        async with AsyncClient(mesh.target) as client:
            chunks = [c async for c in client.generate(prompt, max_tokens=8, ignore_eos=True)]
        without_cert = ChannelConfig(tls_ca_path=certs["ca.pem"])
        async with AsyncClient(mesh.target, without_cert) as stranger:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stranger.cluster_state(timeout_s=5)
        placement = chunks[-1].placement
        return [t for c in chunks for t in c.token_ids], placement.plan if placement else None, refused.value.code()

    try:
        tokens, plan, refused = asyncio.run(run())
    finally:
        stop_mesh(mesh)
    assert tokens == engine_greedy(mesh_model, [prompt], 8)[0]
    assert plan is ExecutionPlan.DISAGGREGATED  # Reserve, Prefill and Generate all went over mTLS
    assert refused == grpc.StatusCode.UNAVAILABLE  # a client without a certificate is turned away
