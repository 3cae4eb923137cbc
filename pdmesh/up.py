"""`pdmesh up`: the whole mesh as local processes on one machine.

Starts a scheduler, N prefill and M decode workers (each `pdmesh serve ...`, the same command
lines docker-compose uses), waits until every worker has registered with the scheduler, prints
the endpoint and an example command, shows every process's log behind its name, and on Ctrl-C
(or SIGTERM) stops them all: SIGTERM first so each drains, SIGKILL for any that outstay the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

from pdmesh.client import AsyncClient, Client

_STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class MeshPlan:
    port: int = 50051
    prefill: int = 1
    decode: int = 1
    model: str = "smollm2"
    device: str = "cpu"
    threads: int | None = None
    host: str = "127.0.0.1"
    extra_worker_args: tuple[str, ...] = field(default_factory=tuple)
    env: tuple[tuple[str, str], ...] = ()  # extra PDMESH_* settings for every process

    def commands(self) -> list[tuple[str, list[str], dict[str, str]]]:
        """(name, argv, extra environment) of every process, scheduler first."""
        exe = [sys.executable, "-m", "pdmesh"]
        procs: list[tuple[str, list[str], dict[str, str]]] = [
            ("scheduler", [*exe, "serve", "scheduler", "--port", str(self.port), "--model", self.model], dict(self.env))
        ]
        gpus = _gpu_count() if self.device == "cuda" else 0
        for role, count, offset in (("prefill", self.prefill, 1), ("decode", self.decode, 1 + self.prefill)):
            for i in range(count):
                n = offset + i
                argv = [
                    *exe, "serve", role, "--port", str(self.port + n), "--kv-port", str(self.port + 100 + n),
                    "--scheduler", f"{self.host}:{self.port}", "--model", self.model, "--device", self.device,
                    "--worker-id", f"{role}-{i}", *self.extra_worker_args,
                ]  # fmt: skip
                if self.threads:
                    argv += ["--threads", str(self.threads)]
                env = dict(self.env)
                if gpus:
                    # Decode workers from GPU 0 up, prefill workers from the last GPU down.
                    gpu = i % gpus if role == "decode" else (gpus - 1 - i % gpus)
                    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
                procs.append((f"{role}-{i}", argv, env))
        return procs


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


class Mesh:
    """The processes of one mesh. Plain subprocesses and a log thread each, so a mesh outlives any
    one event loop (tests start it from sync code and talk to it from many loops)."""

    def __init__(self, plan: MeshPlan) -> None:
        self.plan = plan
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pumps: list[threading.Thread] = []

    @property
    def target(self) -> str:
        return f"{self.plan.host}:{self.plan.port}"

    def start(self, timeout_s: float = 600.0) -> None:
        for name, argv, env in self.plan.commands():
            self._spawn(name, argv, env)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.procs[name] = proc
        pump = threading.Thread(target=_pump, args=(name, proc), name=f"log-{name}", daemon=True)
        pump.start()
        self._pumps.append(pump)

    def restart(self, name: str, timeout_s: float = 600.0) -> None:
        """Start a killed process again with its own command line (failure tests: a worker that
        comes back), and wait until the scheduler lists every worker as serving again."""
        if self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is still running; kill it first")
        argv, env = next((a, e) for n, a, e in self.plan.commands() if n == name)
        since_ms = time.time() * 1000
        self._spawn(name, argv, env)
        deadline = time.monotonic() + timeout_s
        with Client(self.target) as client:
            while time.monotonic() < deadline:
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited during start-up (see its log above)")
                with contextlib.suppress(grpc.RpcError, StopIteration):
                    # Its old registration can linger until the scheduler notices the death: wait for
                    # a report from the new process.
                    w = client.cluster_state(timeout_s=2).worker(name)
                    if w.health is not None and w.health.name == "SERVING" and w.last_report_unix_ms > since_ms:
                        return
                time.sleep(0.3)
        raise TimeoutError(f"{name} was not serving again within {timeout_s:.0f} s")

    def wait_ready(self, timeout_s: float) -> None:
        """Until the scheduler lists every worker as serving, or a process dies."""
        want = self.plan.prefill + self.plan.decode
        deadline = time.monotonic() + timeout_s
        with Client(self.target) as client:
            while time.monotonic() < deadline:
                dead = [n for n, p in self.procs.items() if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited during start-up (see its log above)")
                with contextlib.suppress(grpc.RpcError):
                    state = client.cluster_state(timeout_s=2)
                    if sum(1 for w in state.workers if w.health is not None and w.health.name == "SERVING") >= want:
                        return
                time.sleep(0.3)
        raise TimeoutError(f"the mesh was not ready within {timeout_s:.0f} s")

    def kill(self, name: str) -> None:
        """SIGKILL one process of the mesh (failure tests): no drain, no goodbye."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        """SIGTERM everything (each service drains), then SIGKILL what outstays the grace."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pump in self._pumps:
            pump.join(timeout=5)


def _pump(name: str, proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    width = 10
    for line in proc.stdout:
        sys.stderr.write(f"{name:>{width}} | {line.decode(errors='replace')}")
    code = proc.wait()
    if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
        sys.stderr.write(f"{name:>{width}} | exited with {code}\n")


async def run_up(plan: MeshPlan, demo_prompt: str | None, exit_after_demo: bool) -> int:
    mesh = Mesh(plan)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.to_thread(mesh.start)
        print(f"\npdmesh is up: scheduler at {mesh.target} ({plan.prefill} prefill, {plan.decode} decode, "
              f"{plan.model} on {plan.device})")  # fmt: skip
        print(f'try:  pdmesh generate --target {mesh.target} --chat "What is the capital of France?"\n', flush=True)
        if demo_prompt is not None:
            await _demo(mesh.target, demo_prompt)
        if not exit_after_demo:
            print("Ctrl-C stops the mesh.", flush=True)
            await stop.wait()
        return 0
    finally:
        print("stopping the mesh ...", file=sys.stderr, flush=True)
        await asyncio.to_thread(mesh.stop)


async def _demo(target: str, prompt: str) -> None:
    print(f"> {prompt}", flush=True)
    try:
        async with AsyncClient(target) as client:
            async for chunk in client.generate([{"role": "user", "content": prompt}], max_tokens=64):
                print(chunk.text, end="", flush=True)
                if chunk.usage is not None and chunk.placement is not None:
                    u, p = chunk.usage, chunk.placement
                    print(f"\n[{u.completion_tokens} tokens; TTFT {u.ttft_ms:.0f} ms, e2e {u.e2e_ms:.0f} ms; "
                          f"plan {p.plan.name if p.plan else '?'}]", flush=True)  # fmt: skip
    except grpc.aio.AioRpcError as e:
        print(f"\ndemo request failed: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
