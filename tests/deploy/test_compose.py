"""`docker compose up` for real: the CPU mesh in containers, from images built here.

The scenario a user of docker-compose.cpu.yml lives through: every service comes up healthy; a
chat request through the scheduler's published port is answered — greedy SmolLM2 says Paris, with
the KV moved from the prefill container to the decode container — and through the published
OpenAI API port too; both workers map the KV store's memory tier (the kv-memory volume) and copy
blocks through it; the decode container dies by
SIGKILL, its restart policy brings it back and the mesh answers the same again; `down` leaves no
container, network or volume behind.

Needs a container engine (one is started if none runs), root, and minutes: `make compose-test`.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from engine.tokenizer import Tokenizer
from pdmesh.client import Client, Completion, ExecutionPlan, FinishReason, WorkerHealth, WorkerRole
from tests.deploy.compose import ComposeProject, service_of
from tests.deploy.container_engine import ContainerEngine, container_engine
from tests.deploy.images import base_image, build_images, local_torch
from tests.mesh.conftest import engine_greedy

pytestmark = [pytest.mark.compose, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
CPU_FILE = ROOT / "docker-compose.cpu.yml"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
_MAPPED = "kv store memory mapped"  # a worker's log line (services/worker/shared_memory.py)
MAX_TOKENS = 16
HEALTHY_TIMEOUT_S = 600.0  # the workers' start_period (300 s) and then some, on a busy machine


@pytest.fixture(scope="module")
def engine() -> Iterator[ContainerEngine]:
    with container_engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def project(engine: ContainerEngine) -> Iterator[ComposeProject]:
    """The CPU file's project, its images built, brought up; taken down afterwards whatever happened."""
    name = f"pdmesh-test-{uuid.uuid4().hex[:8]}"
    variables = {
        "PDMESH_PORT": str(_free_port()),
        "PDMESH_OPENAI_ADDRESS": f"127.0.0.1:{_free_port()}",
        # Under slo an idle decode worker prefills a short prompt itself; this test is about the
        # KV moving between containers, so it asks for a placement that hands off.
        "PDMESH_SCHEDULER_POLICY": "least_loaded",
    }
    project = ComposeProject(engine, CPU_FILE, name, variables)
    args = project.config()["services"]["scheduler"]["build"]["args"]
    project.variables["PDMESH_BASE_IMAGE"] = base_image(engine, args["BASE"])
    wheel = local_torch(args["TORCH"], ROOT / "deploy" / "wheels")
    if wheel is not None:
        project.variables |= {"PDMESH_TORCH": str(wheel.relative_to(ROOT)), "PDMESH_TORCH_INDEX_URL": ""}
    build_images(engine, project.config())
    try:
        project.compose("up", "--detach", timeout_s=HEALTHY_TIMEOUT_S)
        yield project
    finally:
        with contextlib.suppress(Exception):
            project.down()


@pytest.fixture(scope="module")
def expected_tokens() -> list[int]:
    """The engine's own greedy answer on this host: what the containers must reproduce."""
    tok = Tokenizer.from_model("smollm2")
    return engine_greedy("smollm2", [tok.encode(tok.apply_chat_template(CHAT))], MAX_TOKENS)[0]


def test_every_service_becomes_healthy(project: ComposeProject) -> None:
    containers = project.wait_healthy(HEALTHY_TIMEOUT_S)
    assert {service_of(c) for c in containers} == project.default_services()
    assert all(c["HostConfig"]["Init"] for c in containers), "every service runs under an init"


def test_answers_through_the_published_port(project: ComposeProject, expected_tokens: list[int]) -> None:
    project.wait_healthy(HEALTHY_TIMEOUT_S)
    answer = ask(project)
    assert "Paris" in answer.text
    assert list(answer.token_ids) == expected_tokens
    assert answer.placement is not None and answer.placement.plan is ExecutionPlan.DISAGGREGATED


def test_the_openai_api_answers_through_its_published_port(project: ComposeProject) -> None:
    project.wait_healthy(HEALTHY_TIMEOUT_S)
    ask(project)  # the mesh has both roles
    base_url = f"http://{project.variables['PDMESH_OPENAI_ADDRESS']}/v1"
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="smollm2", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS


def test_the_workers_map_the_kv_stores_memory(project: ComposeProject) -> None:
    """The store's memory tier is a file of the kv-memory volume that the workers mount too: each
    maps it once the scheduler names the store, and copies blocks through it instead of UCX."""
    project.wait_healthy(HEALTHY_TIMEOUT_S)
    ask(project)  # the mesh has both roles and the store, and the answer's blocks were offered
    with Client(f"127.0.0.1:{project.variables['PDMESH_PORT']}") as client:
        (store,) = client.cluster_state().kv_stores
    assert store.shared_memory, store
    deadline = time.monotonic() + 60
    while unmapped := [s for s in ("prefill", "decode") if _MAPPED not in _log_of(project, s)]:
        assert time.monotonic() < deadline, f"{unmapped} never mapped the store's memory"
        time.sleep(1)


def test_killed_decode_is_restarted_and_serves_again(project: ComposeProject, expected_tokens: list[int]) -> None:
    project.wait_healthy(HEALTHY_TIMEOUT_S)
    restarts = project.kill("decode")
    project.wait_restarted("decode", restarts, timeout_s=120)
    project.wait_healthy(HEALTHY_TIMEOUT_S)
    answer = ask(project)
    assert list(answer.token_ids) == expected_tokens
    assert answer.placement is not None and answer.placement.decode_worker_id == "decode-0"
    # The first answer left the prompt's full blocks in the KV store: the restarted worker may
    # fetch them and prefill only the rest itself, or take a hand-off; both move KV between
    # containers.
    from_store = answer.usage is not None and answer.usage.store_cached_prompt_tokens > 0
    assert answer.placement.plan is ExecutionPlan.DISAGGREGATED or from_store, answer


def test_down_leaves_nothing_behind(project: ComposeProject) -> None:
    assert project.leftovers() != [], "the project is up before it is taken down"
    project.down()
    assert project.leftovers() == []


def ask(project: ComposeProject, timeout_s: float = 120.0) -> Completion:
    """The chat question through the published port, once the scheduler has both roles and sees
    every worker serving (a container turns healthy as it serves; registering follows)."""
    with Client(f"127.0.0.1:{project.variables['PDMESH_PORT']}") as client:
        deadline = time.monotonic() + timeout_s
        while not _mesh_ready(client):
            assert time.monotonic() < deadline, f"the scheduler lists no serving mesh: {client.cluster_state()}"
            time.sleep(1)
        answer = client.complete(CHAT, max_tokens=MAX_TOKENS, ignore_eos=True, timeout_s=timeout_s)
    assert answer.finish_reason is FinishReason.LENGTH
    return answer


def _log_of(project: ComposeProject, service: str) -> str:
    return project.logs(project.container(service)["Id"], lines=5000)


def _mesh_ready(client: Client) -> bool:
    try:
        workers = client.cluster_state(timeout_s=5).workers
    except grpc.RpcError:
        return False
    roles = {w.role for w in workers}
    return {WorkerRole.PREFILL, WorkerRole.DECODE} <= roles and all(w.health is WorkerHealth.SERVING for w in workers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
