"""The worker registry and placement as an operator sees them through GetClusterState and
ListModels: registration, load reports, staleness and draining, and the two shipped policies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import cast

from scheduler_mesh import Mesh, MeshFactory, eventually
from scripted_workers import KV_BLOCKS, LAYOUT, MAX_MODEL_LEN, expected_tokens

from pdmesh.client import Chunk, ExecutionPlan
from pdmesh.config import PolicyName
from pdmesh.v1 import scheduler_pb2, worker_pb2

SERVING, DRAINING, STALE = (
    worker_pb2.WORKER_HEALTH_SERVING,
    worker_pb2.WORKER_HEALTH_DRAINING,
    worker_pb2.WORKER_HEALTH_STALE,
)


async def decode_worker_of(mesh: Mesh, prompt: list[int]) -> str:
    chunks = [c async for c in mesh.client.generate(prompt, max_tokens=2, seed=1)]
    assert chunks[-1].placement is not None
    return chunks[-1].placement.decode_worker_id


async def health_of(mesh: Mesh) -> dict[str, int]:
    return {w.info.worker_id: w.health for w in (await mesh.cluster()).workers}


async def wait_health(mesh: Mesh, worker_id: str, health: int, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await health_of(mesh)).get(worker_id) != health:
        assert asyncio.get_running_loop().time() < deadline, f"{worker_id} never became {health}"
        await asyncio.sleep(0.02)


async def test_a_worker_that_stops_reporting_turns_stale_and_leaves_placement_until_it_reports_again(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(prefill=0, decode=2, stale_after_ms=300)
    silent = mesh.decode[0]
    await silent.stop_reporting()

    await wait_health(mesh, "decode-0", STALE)

    assert (await health_of(mesh))["decode-1"] == SERVING
    assert [await decode_worker_of(mesh, [1, 2, 3]) for _ in range(4)] == ["decode-1"] * 4
    assert mesh.decode_servicer(0).generates == []
    [model] = (await mesh.stub.ListModels(scheduler_pb2.ListModelsRequest())).models
    assert model.num_decode_workers == 1
    # Reporting again (the worker registers anew) puts it back into placement.
    silent.start_reporting(mesh.target, mesh.model)
    await wait_health(mesh, "decode-0", SERVING)
    mesh.decode[1].free_blocks = 4
    await mesh.wait_reported()
    assert await decode_worker_of(mesh, [1, 2, 3]) == "decode-0"


async def test_a_draining_worker_takes_no_new_requests(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=2)
    reporter = mesh.decode[0].reporter
    assert reporter is not None
    reporter.draining = True

    await wait_health(mesh, "decode-0", DRAINING)

    assert [await decode_worker_of(mesh, [4, 5]) for _ in range(3)] == ["decode-1"] * 3


async def test_registration_answers_the_report_interval_and_an_unknown_reporter_is_asked_to_register(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(prefill=0, decode=0, report_interval_ms=250)

    unknown = await mesh.registry.ReportLoad(worker_pb2.ReportLoadRequest(worker_id="ghost", report_seq=1))
    assert unknown.reregister

    info = worker_pb2.WorkerInfo(
        worker_id="decode-9", role=worker_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1",
        kv_transfer_address="127.0.0.1:2", model=mesh.model, kv_layout=LAYOUT,
        capacity=worker_pb2.WorkerCapacity(num_kv_blocks_total=KV_BLOCKS, max_model_len_tokens=MAX_MODEL_LEN),
    )  # fmt: skip
    registered = await mesh.registry.RegisterWorker(worker_pb2.RegisterWorkerRequest(worker=info))
    assert registered.report_interval_ms == 250
    known = await mesh.registry.ReportLoad(
        worker_pb2.ReportLoadRequest(worker_id="decode-9", report_seq=1, health=SERVING)
    )
    assert not known.reregister

    # The same worker_id registering again (a restarted worker) replaces the old entry.
    info.address = "127.0.0.1:3"
    await mesh.registry.RegisterWorker(worker_pb2.RegisterWorkerRequest(worker=info))
    workers = (await mesh.cluster()).workers
    assert [(w.info.worker_id, w.info.address) for w in workers] == [("decode-9", "127.0.0.1:3")]


async def test_a_worker_registering_again_at_the_same_address_keeps_its_streams(mesh_factory: MeshFactory) -> None:
    """A worker's reporter registers again after any failed report; its requests must not notice."""
    mesh = await mesh_factory(prefill=0, decode=1)
    mesh.decode_servicer().token_delay_s = 0.02
    info = mesh.decode[0].info(mesh.model)

    async def run() -> list[int]:
        got: list[int] = []
        again = None
        async for chunk in mesh.client.generate([1, 2, 3], max_tokens=30, seed=3):
            got += chunk.token_ids
            if again is None and len(got) >= 5:
                again = asyncio.ensure_future(
                    mesh.registry.RegisterWorker(worker_pb2.RegisterWorkerRequest(worker=info))
                )
        return got

    assert await asyncio.wait_for(run(), 3) == expected_tokens(3, 3, 30)
    # The count of requests on it starts again with the registration and comes back to zero: a
    # count carried over would make the worker look busy for good and skew placement.
    await eventually_async(mesh, lambda s: s.workers[0].num_assigned_requests == 0, "assigned back to 0")


async def eventually_async(
    mesh: Mesh, check: Callable[[scheduler_pb2.GetClusterStateResponse], bool], what: str, timeout_s: float = 5.0
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check(await mesh.cluster()):
        assert asyncio.get_running_loop().time() < deadline, f"{what} did not happen within {timeout_s} s"
        await asyncio.sleep(0.02)


async def test_cluster_state_lists_workers_sorted_by_id(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=0)
    for worker_id in ("decode-b", "decode-a", "decode-c"):
        info = worker_pb2.WorkerInfo(
            worker_id=worker_id, role=worker_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1",
            kv_transfer_address="127.0.0.1:2", model=mesh.model, kv_layout=LAYOUT,
            capacity=worker_pb2.WorkerCapacity(num_kv_blocks_total=KV_BLOCKS, max_model_len_tokens=MAX_MODEL_LEN),
        )  # fmt: skip
        await mesh.registry.RegisterWorker(worker_pb2.RegisterWorkerRequest(worker=info))

    assert [w.info.worker_id for w in (await mesh.cluster()).workers] == ["decode-a", "decode-b", "decode-c"]


async def test_cluster_state_shows_workers_loads_and_requests_in_flight(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    mesh.decode[0].free_blocks = 40
    await mesh.wait_reported()
    decode = mesh.decode_servicer()
    decode.token_delay_s = 0.05

    stream = cast(AsyncGenerator[Chunk, None], mesh.client.generate(list(range(1, 101)), max_tokens=50, seed=2))
    async with contextlib.aclosing(stream):
        await anext(stream)
        await eventually(lambda: decode.running == 1, what="the decode stream to start")
        state = await mesh.cluster()

    assert state.policy == "least_loaded"
    assert state.time_unix_ms > 0
    assert state.num_running_requests == 1
    by_id = {w.info.worker_id: w for w in state.workers}
    assert set(by_id) == {"prefill-0", "decode-0"}
    d = by_id["decode-0"]
    assert d.info.role == worker_pb2.WORKER_ROLE_DECODE and d.info.address == mesh.decode[0].address
    assert d.health == SERVING and d.last_report_unix_ms > 0
    assert (d.load.num_kv_blocks_free, d.load.num_kv_blocks_total) == (40, KV_BLOCKS)
    assert d.num_assigned_requests == 1
    assert by_id["prefill-0"].num_assigned_requests == 0


async def test_list_models_names_the_served_model_with_its_workers(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=2)

    [model] = (await mesh.stub.ListModels(scheduler_pb2.ListModelsRequest())).models

    assert model.name == mesh.model
    assert model.model_fingerprint == LAYOUT.model_fingerprint
    assert model.max_model_len_tokens == MAX_MODEL_LEN
    assert (model.num_prefill_workers, model.num_decode_workers) == (1, 2)


async def test_round_robin_takes_the_decode_workers_in_turn(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=2, policy=PolicyName.ROUND_ROBIN)

    placed = [await decode_worker_of(mesh, [1, 2, 3]) for _ in range(4)]

    assert sorted(placed) == ["decode-0", "decode-0", "decode-1", "decode-1"]
    assert placed[0] != placed[1] and placed[1] != placed[2] and placed[2] != placed[3]


async def test_least_loaded_takes_the_decode_worker_with_the_most_free_blocks(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=2, policy=PolicyName.LEAST_LOADED)
    mesh.decode[0].free_blocks = 8
    await mesh.wait_reported()

    assert await decode_worker_of(mesh, [1, 2, 3]) == "decode-1"
    mesh.decode[0].free_blocks, mesh.decode[1].free_blocks = 60, 10
    await mesh.wait_reported()
    assert await decode_worker_of(mesh, [1, 2, 3]) == "decode-0"


async def test_the_local_prefill_threshold_counts_uncached_prompt_tokens(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, local_prefill_max_tokens=10)

    short = [c async for c in mesh.client.generate(list(range(1, 11)), max_tokens=2, seed=3)]
    long = [c async for c in mesh.client.generate(list(range(1, 12)), max_tokens=2, seed=3)]

    assert short[-1].placement is not None and short[-1].placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert long[-1].placement is not None and long[-1].placement.plan is ExecutionPlan.DISAGGREGATED
    assert [t for c in long for t in c.token_ids] == expected_tokens(3, 11, 2)
