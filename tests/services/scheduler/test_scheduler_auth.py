"""Bearer keys at the scheduler's door: with api_keys configured, every Scheduler call must carry
one of them (gRPC metadata `authorization: Bearer KEY`) or is refused UNAUTHENTICATED, saying how
to authenticate and echoing nothing; any of several keys works; health and the workers' Registry
calls are not asked. With none configured (the default), nothing is asked."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scheduler_mesh import MeshFactory
from scripted_workers import expected_tokens

from pdmesh.client import AsyncClient
from pdmesh.config import ChannelConfig

KEYS = ("key-one-7f3a", "key-two-91bc")


@pytest.mark.parametrize("presented", [None, "wrong-key", "key-one-7f3a-but-longer"])
async def test_a_call_without_an_accepted_key_is_unauthenticated(
    mesh_factory: MeshFactory, presented: str | None
) -> None:
    mesh = await mesh_factory(prefill=0, decode=1, api_keys=KEYS)  # its workers registered: Registry is open
    async with AsyncClient(mesh.target, ChannelConfig(api_key=presented)) as client:
        for call in (client.complete([1, 2, 3], max_tokens=2), client.cluster_state(), client.list_models()):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            details = refused.value.details() or ""
            assert details.startswith("authorization: ") and "Bearer KEY" in details
            assert (presented or "") not in details or presented is None
    assert mesh.decode_servicer().generates == []


async def test_any_configured_key_is_accepted_and_health_asks_none(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1, api_keys=KEYS)
    for key in KEYS:
        async with AsyncClient(mesh.target, ChannelConfig(api_key=key)) as client:
            assert (await client.complete([1, 2, 3], max_tokens=3, seed=5)).token_ids == tuple(expected_tokens(5, 3, 3))
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):  # health follows the registry within a fraction of a second
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_no_keys_configured_asks_for_none(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1)
    async with AsyncClient(mesh.target, ChannelConfig()) as client:
        assert (await client.complete([1, 2, 3], max_tokens=2, seed=5)).token_ids == tuple(expected_tokens(5, 3, 2))
