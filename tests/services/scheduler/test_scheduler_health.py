"""The scheduler's health tells the truth: SERVING (grpc.health.v1, as load balancers, compose
and Kubernetes probes ask it) only while a request could be served, that is while some decode
worker is live; its Registry serves from start-up, so workers can register before that."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scheduler_mesh import REGISTRY, Mesh, MeshFactory

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(mesh: Mesh, service: str = "") -> int:
    async with grpc.aio.insecure_channel(mesh.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def wait_for(mesh: Mesh, status: int, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await health(mesh) != status:
        assert asyncio.get_running_loop().time() < deadline, f"the scheduler's health never became {status}"
        await asyncio.sleep(0.02)


async def test_no_decode_worker_means_not_serving_though_workers_can_register(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=0)

    assert await health(mesh) == NOT_SERVING
    assert await health(mesh, "pdmesh.v1.Scheduler") == NOT_SERVING
    assert await health(mesh, REGISTRY) == SERVING


async def test_health_follows_the_last_decode_worker_going_silent_and_coming_back(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, stale_after_ms=300)
    await wait_for(mesh, SERVING)
    decode = mesh.decode[0]

    await decode.stop_reporting()
    await wait_for(mesh, NOT_SERVING)
    assert await health(mesh, REGISTRY) == SERVING

    decode.start_reporting(mesh.target, mesh.model)
    await wait_for(mesh, SERVING)
    assert [t async for c in mesh.client.generate([1, 2, 3], max_tokens=2, seed=1) for t in c.token_ids]
