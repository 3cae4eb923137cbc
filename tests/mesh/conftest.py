"""Real meshes on loopback: a scheduler, prefill and decode workers as separate processes,
KV moving between them over UCX/tcp. Each test module starts the mesh it needs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import BatcherConfig, CacheConfig, EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from pdmesh.ports import PortClaim, PortInUse, check_free
from pdmesh.up import Mesh, MeshSpec
from tests.engine.conftest import save_tiny_model

BLOCK_SIZE = 4
KV_BLOCKS = 512
HTTP_PORT_OFFSET = 300  # the scheduler's HTTP door: past the KV store's /metrics (port + 299)


@pytest.fixture(scope="session")
def mesh_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Long enough context for slow, chunked prefills in the failure tests.
    return save_tiny_model(tmp_path_factory.mktemp("mesh_model"), max_position_embeddings=4096, seed=7)


def free_port_base(workers: int = 8) -> int:
    """A base port whose mesh ports are free now: base..base+workers (gRPC), base+100.. (KV
    listeners), base+200.. (/metrics), the KV store's base+99, +199, +299 and the scheduler's HTTP
    door's base+300; below Linux's
    ephemeral range, where other processes' outgoing ports land."""
    for _ in range(100):
        base = random.randrange(20000, 32000, 400)
        ports = [p for offset in (0, 100, 200) for p in range(base + offset - 1, base + offset + workers + 1)]
        try:
            ports += [base + 299, base + HTTP_PORT_OFFSET]
            check_free([PortClaim(p, "0.0.0.0", "a mesh port") for p in ports], "")
        except PortInUse:
            continue
        return base
    raise RuntimeError("no free block of mesh ports between 20000 and 32000")


def start_mesh(
    model: Path | str, prefill: int, decode: int, *extra: str, timeout_s: float = 180,
    env: dict[str, str] | None = None, kvstore: bool = True, kvstore_args: tuple[str, ...] = (),
    grace_s: float = 30.0,
) -> Mesh:  # fmt: skip
    """A mesh of real processes, with a KV store unless told not; `env` adds PDMESH_* settings to
    every one of them; `grace_s` is each one's drain on SIGTERM."""
    args = ("--threads", "1", "--kv-blocks", str(KV_BLOCKS), "--block-size", str(BLOCK_SIZE), *extra)
    settings = {"PDMESH_SCHEDULER_REPORT_INTERVAL_MS": "100", **(env or {})}  # fresh load reports for the observers
    port = free_port_base()
    spec = MeshSpec(
        port=port, prefill=prefill, decode=decode, model=str(model), extra_worker_args=args,
        http_port=port + HTTP_PORT_OFFSET,  # never the default 8000: meshes of other runs may share the machine
        env=tuple(settings.items()), kvstore=kvstore, kvstore_args=kvstore_args, grace_s=grace_s,
    )
    mesh = Mesh(spec)
    mesh.start(timeout_s)
    return mesh


def stop_mesh(mesh: Mesh) -> None:
    mesh.stop()


SMOLLM2_API_KEY = "test-key"  # the shared SmolLM2 mesh's HTTP door asks for it (gRPC does not: the
# deprecated PDMESH_HTTP_API_KEYS guards its one door, so the tests' gRPC clients need no key)


@pytest.fixture(scope="session")
def smollm2_mesh() -> Iterator[Mesh]:
    """One SmolLM2 mesh (1 prefill, 1 decode) for the modules that need the real model: its
    start costs ~30 s on a busy 2-core machine, so they share it. None of them is about admission:
    requests that bring no SLO get no TTFT target here (the default 30 s one is a forecast the `slo`
    policy may refuse on a machine loaded 10-16 deep, which refused some of the 50 concurrent
    streams in full-suite runs); those that bring one are still placed by it."""
    env = {"PDMESH_HTTP_API_KEYS": f"other-key,{SMOLLM2_API_KEY}", "PDMESH_SLO_DEFAULT_TTFT_MS": "0"}
    mesh = start_mesh("smollm2", 1, 1, env=env)
    yield mesh
    stop_mesh(mesh)


@pytest.fixture()
def mesh_factory() -> Iterator:
    started: list[Mesh] = []

    def make(
        model: Path | str, prefill: int = 1, decode: int = 1, *extra: str, env: dict[str, str] | None = None
    ) -> Mesh:
        mesh = start_mesh(model, prefill, decode, *extra, env=env)
        started.append(mesh)
        return mesh

    yield make
    for mesh in started:
        stop_mesh(mesh)


def engine_greedy(model: Path | str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The single-process engine's greedy continuation: what the mesh must reproduce."""
    engine = Engine.from_config(
        EngineConfig(
            model=str(model), torch_threads=1,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=KV_BLOCKS), batcher=BatcherConfig(),
        )
    )  # fmt: skip
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]
