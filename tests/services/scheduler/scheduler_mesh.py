"""A scheduler served by the real serve_scheduler() in this process, with scripted workers.

`Mesh(model, settings).start(prefill, decode)` (what the mesh_factory fixture calls) starts a
scheduler on a loopback port (settings are SchedulerConfig fields; `http` a dict of HttpConfig
fields), its OpenAI HTTP door on another (`http_url`), then scripted prefill and
decode workers that register and report through the real worker Reporter, and waits until the
scheduler lists them all as reported. Clients talk to it with the public client library or raw
stubs, as users do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from scripted_workers import KV_BLOCKS, ScriptedDecode, ScriptedPrefill, ScriptedWorker, start_worker, stop_worker
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from pdmesh.client import AsyncClient
from pdmesh.config import ChannelConfig, HttpConfig, PolicyName, SchedulerConfig, ServerConfig
from pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.scheduler.server import serve_scheduler

REGISTRY = worker_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def write_byte_tokenizer(path: Path, bos: bool = False) -> Path:
    """A byte-level tokenizer (ids 0..255 are bytes, 256 <s>, 257 </s>) with a chat template;
    with `bos`, encoding text with special tokens starts it with <s>, as Llama's tokenizers do."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.01)


class Mesh:
    """A scheduler and its scripted workers; `client` is the public client library's."""

    def __init__(self, model: str, settings: dict[str, Any]) -> None:
        self.model = model
        self.target = f"127.0.0.1:{free_port()}"
        self.http_url = f"http://127.0.0.1:{free_port()}"  # the OpenAI HTTP door
        http = HttpConfig(port=int(self.http_url.rsplit(":", 1)[1]), **settings.pop("http", {}))
        self.config = SchedulerConfig(
            server=ServerConfig(host="127.0.0.1", port=int(self.target.rsplit(":", 1)[1]), shutdown_grace_s=0.2),
            # The flow's tests run least_loaded, whose plan rule they script; slo has its own tests.
            # The scripted workers report on the test's own event loop, which a loaded CI machine
            # can hold up for seconds: a worker counts as silent only after 30 s here (CI once saw
            # a live worker go stale under the default 3 s), and tests of staleness set their own.
            model=model, http=http,
            **{"report_interval_ms": 50, "stale_after_ms": 30_000, "policy": PolicyName.LEAST_LOADED, **settings},
        )  # fmt: skip
        self.prefill: list[ScriptedWorker] = []
        self.decode: list[ScriptedWorker] = []
        self._task: asyncio.Task[None] | None = None
        self._channel = grpc.aio.insecure_channel(self.target)
        # With api_keys, the harness itself presents the first (a test's own clients choose theirs).
        key = self.config.api_keys[0] if self.config.api_keys else None
        self.client = AsyncClient(self.target, ChannelConfig(api_key=key))
        self._metadata = (("authorization", f"Bearer {key}"),) if key else None
        self.stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self.registry = worker_pb2_grpc.RegistryStub(self._channel)

    @property
    def workers(self) -> list[ScriptedWorker]:
        return self.prefill + self.decode

    def prefill_servicer(self, i: int = 0) -> ScriptedPrefill:
        servicer = self.prefill[i].servicer
        assert isinstance(servicer, ScriptedPrefill)
        return servicer

    def decode_servicer(self, i: int = 0) -> ScriptedDecode:
        servicer = self.decode[i].servicer
        assert isinstance(servicer, ScriptedDecode)
        return servicer

    async def start(self, prefill: int, decode: int) -> None:
        self._task = asyncio.create_task(serve_scheduler(self.config))
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + 10
        while True:
            assert not self._task.done(), "serve_scheduler exited during start-up"
            with contextlib.suppress(grpc.aio.AioRpcError):
                # The Registry serves from start-up; the scheduler as a whole only once a decode
                # worker is live.
                reply = await health.Check(health_pb2.HealthCheckRequest(service=REGISTRY), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            assert time.monotonic() < deadline, "the scheduler's Registry never became SERVING"
            await asyncio.sleep(0.02)
        for i in range(prefill):
            self.prefill.append(await start_worker(f"prefill-{i}", worker_pb2.WORKER_ROLE_PREFILL))
        for i in range(decode):
            self.decode.append(await start_worker(f"decode-{i}", worker_pb2.WORKER_ROLE_DECODE))
        for worker in self.workers:
            worker.start_reporting(self.target, self.model)
        await self.wait_reported()

    async def cluster(self) -> scheduler_pb2.GetClusterStateResponse:
        return await self.stub.GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=5, metadata=self._metadata
        )

    async def wait_reported(self, free_blocks: dict[str, int] | None = None) -> None:
        """Until every worker is SERVING with a load report (showing `free_blocks` where given)."""
        want = {w.worker_id: w.free_blocks for w in self.workers} | (free_blocks or {})
        deadline = time.monotonic() + 10
        while True:
            state = await self.cluster()
            seen = {
                w.info.worker_id: w.load.num_kv_blocks_free for w in state.workers
                if w.health == worker_pb2.WORKER_HEALTH_SERVING and w.load.num_kv_blocks_total == KV_BLOCKS
            }  # fmt: skip
            if all(seen.get(worker_id) == free for worker_id, free in want.items()):
                return
            assert time.monotonic() < deadline, f"workers never all reported: {seen} != {want}"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.client.close()
        await self._channel.close()
        for worker in self.workers:
            await stop_worker(worker)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


MeshFactory = Callable[..., Awaitable["Mesh"]]
