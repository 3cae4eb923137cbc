"""The mesh end to end, with real processes: correctness, cancellation, leases, failures, bad input.

Every scenario talks to the scheduler through the client library, exactly as a user would, and
observes worker state through GetClusterState.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdmesh.client import AsyncClient, ClusterState
from pdmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from tests.mesh.conftest import engine_greedy, start_mesh, stop_mesh

pytestmark = pytest.mark.slow


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


async def tokens_of(client: AsyncClient, prompt: list[int], max_tokens: int, **options: object) -> list[int]:
    out: list[int] = []
    async for chunk in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, **options):
        out += chunk.token_ids
    return out


async def settled(client: AsyncClient, timeout_s: float = 15.0) -> ClusterState:
    """Cluster state once every worker reports all blocks free and nothing reserved or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = await client.cluster_state()
        if all(
            w.num_kv_blocks_total > 0 and w.num_kv_blocks_free == w.num_kv_blocks_total
            and w.num_kv_reservations == 0 and w.num_running_requests == 0
            for w in state.workers
        ) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


def all_free(state: ClusterState) -> bool:
    return all(
        w.num_kv_blocks_total > 0 and w.num_kv_blocks_free == w.num_kv_blocks_total and w.num_kv_reservations == 0
        for w in state.workers
    )


@pytest.fixture(scope="module")
def mesh(mesh_model: Path):
    m = start_mesh(mesh_model, 1, 1)
    yield m
    stop_mesh(m)


def test_greedy_through_the_mesh_equals_the_engine_and_50_streams_are_all_correct(mesh, mesh_model: Path) -> None:
    prompts = prompts_of([3, 40, 120] + [random.Random(i).randrange(1, 200) for i in range(47)])
    expected = engine_greedy(mesh_model, prompts, 12)

    async def run() -> tuple[list[list[int]], ClusterState]:
        async with AsyncClient(mesh.target) as client:
            got = await asyncio.gather(*(tokens_of(client, p, 12) for p in prompts))
            return list(got), await settled(client)

    got, state = asyncio.run(run())
    assert got == expected
    assert all_free(state)


def test_cancel_mid_stream_frees_blocks_on_both_workers(mesh) -> None:
    async def run() -> ClusterState:
        async with AsyncClient(mesh.target) as client:
            stream = client.generate(prompts_of([150], seed=3)[0], max_tokens=400, ignore_eos=True)
            n = 0
            async for _ in stream:
                n += 1
                if n == 5:
                    break
            await stream.aclose()
            return await settled(client)

    assert all_free(asyncio.run(run()))


def test_a_reservation_never_committed_is_freed_when_its_lease_ends(mesh) -> None:
    async def run() -> tuple[ClusterState, grpc.StatusCode]:
        async with AsyncClient(mesh.target) as client:
            state = await client.cluster_state()
            decode = next(w for w in state.workers if w.role is not None and w.role.name == "DECODE")
            async with grpc.aio.insecure_channel(decode.address) as ch:
                stub = decode_pb2_grpc.DecodeStub(ch)
                r = await stub.Reserve(decode_pb2.ReserveRequest(request_id="orphan", num_tokens=40, lease_ms=600))
                assert r.ticket.num_blocks == 10
                await asyncio.sleep(1.0)
                freed = await settled(client)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.Generate(
                        decode_pb2.DecodeGenerateRequest(
                            request_id="orphan", ticket_id=r.ticket.ticket_id, prompt_token_ids=list(range(40)),
                            sampling=common_pb2.SamplingParams(max_tokens=2),
                        )
                    ):
                        pass
                return freed, err.value.code()

    state, code = asyncio.run(run())
    assert all_free(state)
    assert code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("options", "code", "field"),
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"prompt": [1, 2, 99999]}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "model"),
    ],
)
def test_bad_input_gets_its_status_code_naming_the_field(mesh, options: dict, code, field: str) -> None:
    prompt = options.pop("prompt", [1, 2, 3])

    async def run() -> grpc.aio.AioRpcError:
        async with AsyncClient(mesh.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.generate(prompt, **options):
                    pass
            # ... and the mesh still serves the next request.
            assert len(await tokens_of(client, [5, 6, 7], 3)) == 3
            return err.value

    error = asyncio.run(run())
    assert error.code() == code
    assert field in error.details() and "Traceback" not in error.details()


def test_an_unknown_ticket_is_not_found(mesh) -> None:
    async def run() -> grpc.StatusCode:
        async with AsyncClient(mesh.target) as client:
            decode = next(w for w in (await client.cluster_state()).workers if w.role.name == "DECODE")
        async with grpc.aio.insecure_channel(decode.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in decode_pb2_grpc.DecodeStub(ch).Generate(
                    decode_pb2.DecodeGenerateRequest(request_id="x", ticket_id="nope", prompt_token_ids=[1, 2])
                ):
                    pass
            return err.value.code()

    assert asyncio.run(run()) == grpc.StatusCode.NOT_FOUND


def test_no_capacity_is_resource_exhausted(mesh) -> None:
    async def run() -> grpc.StatusCode:
        async with AsyncClient(mesh.target) as client:
            # 3000 prompt tokens need 750 blocks of 4; each worker has 512.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in client.generate(list(range(1, 250)) * 12, max_tokens=8):
                    pass
            return err.value.code()

    assert asyncio.run(run()) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_reflection_answer_standard_clients(mesh) -> None:
    async def run() -> None:
        async with AsyncClient(mesh.target) as client:
            addresses = [mesh.target] + [w.address for w in (await client.cluster_state()).workers]
        for address in addresses:
            async with grpc.aio.insecure_channel(address) as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
                names = [s.name async for r in stream for s in r.list_services_response.service]
                assert "grpc.health.v1.Health" in names
                assert any(n.startswith("pdmesh.v1.") for n in names)

    asyncio.run(run())


def test_no_live_worker_is_unavailable(mesh_model: Path) -> None:
    lonely = start_mesh(mesh_model, 0, 0)
    try:

        async def run() -> grpc.StatusCode:
            async with AsyncClient(lonely.target) as client:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in client.generate([1, 2, 3], max_tokens=2):
                        pass
                return err.value.code()

        assert asyncio.run(run()) == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_mesh(lonely)
