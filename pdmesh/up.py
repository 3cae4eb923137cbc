"""`pdmesh up`: the whole mesh as local processes on one machine, supervised.

Starts a scheduler, N prefill and M decode workers and a KV store (each `pdmesh serve ...`, the
same command lines docker-compose uses) under a Supervisor (pdmesh/supervisor.py): a process that exits is
restarted with backoff, repeated fast failures stop the mesh, and the children die with `up`
however it dies. Before anything starts, every port the mesh will listen on is checked
(pdmesh/ports.py). Every listener binds loopback unless `--host` says otherwise.

Ready means the scheduler lists each of *this* mesh's workers (by id), and its KV store, as
serving, so a foreign server on the port can never pass for the mesh. Stopping goes in order: the
scheduler first, which stops taking requests and lets the streams in flight finish within the
grace while the workers still serve them; then the workers; then the store; SIGKILL only for what
outstays its grace by a margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pdmesh.client import AsyncClient, Client, KVStoreState, WorkerHealth, WorkerState
from pdmesh.config import STOP_MARGIN_S, ChannelConfig, door_keys, from_env
from pdmesh.ports import WILDCARD_HOSTS, PortClaim, check_free
from pdmesh.process_output import Echo, ProcessOutput
from pdmesh.supervisor import ChildSpec, RestartPolicy, Supervisor

_KV_PORT_OFFSET = 100
_METRICS_PORT_OFFSET = 200  # each process's Prometheus /metrics: port + 200 + n (the scheduler's n is 0)
_KVSTORE_PORT_OFFSET = 99  # the store's gRPC port is the scheduler's + 99, its KV listener's + 199, its /metrics + 299
KVSTORE_ID = "kvstore-0"
_PORT_FIX = (
    "Stop whatever listens there (`ss -ltnp` names it), or move the mesh: `pdmesh up --port N` for its"
    " gRPC, KV and metrics ports, `--http-port M` for the OpenAI API"
)


@dataclass(frozen=True)
class MeshSpec:
    # The scheduler's; workers take the next ones, their KV listeners port + 100 + n, every
    # process's /metrics port + 200 + n.
    port: int = 50051
    prefill: int = 1
    decode: int = 1
    model: str = "smollm2"
    device: str = "cpu"
    threads: int | None = None
    host: str = "127.0.0.1"  # every listener binds this; a wildcard opens the mesh to the network
    grace_s: float = 30.0  # each service's drain on SIGTERM
    http_port: int | None = 8000  # the scheduler's OpenAI-compatible HTTP door (on `host` too); None: none
    extra_worker_args: tuple[str, ...] = field(default_factory=tuple)
    env: tuple[tuple[str, str], ...] = ()  # extra PDMESH_* settings for every process
    kvstore: bool = True  # a KV store the workers fill and fetch prefixes from
    kvstore_args: tuple[str, ...] = field(default_factory=tuple)  # e.g. ("--memory-mib", "2048")

    @property
    def kvstore_port(self) -> int:
        return self.port + _KVSTORE_PORT_OFFSET

    @property
    def reach_host(self) -> str:
        """The address the mesh's processes dial each other at."""
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host

    @property
    def workers(self) -> list[tuple[str, int, int]]:
        """(role, index within the role, port offset) of every worker: prefill-0 is ("prefill", 0, 1)."""
        return [("prefill", i, 1 + i) for i in range(self.prefill)] + [
            ("decode", i, 1 + self.prefill + i) for i in range(self.decode)
        ]

    @property
    def worker_ids(self) -> list[str]:
        return [f"{role}-{i}" for role, i, _ in self.workers]
    def commands(self) -> list[ChildSpec]:
        """Every process, scheduler first."""
        exe = (sys.executable, "-m", "pdmesh", "serve")
        common = ("--host", self.host, "--model", self.model, "--shutdown-grace-s", str(self.grace_s))
        # /metrics listens where the gRPC servers do (loopback unless --host says otherwise).
        base_env = (*self.env, ("PDMESH_TELEMETRY_METRICS_HOST", self.host))
        scheduler: tuple[str, ...] = (*exe, "scheduler", "--port", str(self.port), *common, *self._metrics_flag(0))
        if self.http_port is not None:
            scheduler += ("--http-port", str(self.http_port))
        no_http = (("PDMESH_HTTP_PORT", ""),) if self.http_port is None else ()
        specs = [ChildSpec("scheduler", scheduler, (*base_env, *no_http))]
        gpus = _gpu_count() if self.device == "cuda" else 0
        for role, i, n in self.workers:
            worker_id = f"{role}-{i}"
            argv = (
                *exe, role, *common, "--port", str(self.port + n), "--kv-port", str(self.port + _KV_PORT_OFFSET + n),
                "--advertise-host", self.reach_host, "--scheduler", f"{self.reach_host}:{self.port}",
                "--device", self.device, "--worker-id", worker_id, *self._metrics_flag(n), *self.extra_worker_args,
            )  # fmt: skip
            if self.threads:
                argv += ("--threads", str(self.threads))
            env = base_env
            if gpus:
                # Decode workers from GPU 0 up, prefill workers from the last GPU down.
                gpu = i % gpus if role == "decode" else (gpus - 1 - i % gpus)
                env = (*env, ("CUDA_VISIBLE_DEVICES", str(gpu)))
            specs.append(ChildSpec(worker_id, argv, env))
        if self.kvstore:
            argv = (
                *exe, "kvstore", *common, "--port", str(self.kvstore_port),
                "--kv-port", str(self.kvstore_port + _KV_PORT_OFFSET), "--advertise-host", self.reach_host,
                "--scheduler", f"{self.reach_host}:{self.port}", "--worker-id", KVSTORE_ID,
                *self._metrics_flag(_KVSTORE_PORT_OFFSET), *self.kvstore_args,
            )  # fmt: skip
            # Wired up like the GPU workers it serves (services/kvstore/config.py says why).
            store_env = base_env
            if self.device == "cuda":
                store_env = (*base_env, ("PDMESH_KVSTORE_UCX_TLS", "cuda_copy,sm,tcp,self"))
            specs.append(ChildSpec(KVSTORE_ID, argv, store_env))
        return specs

    @property
    def http_base_url(self) -> str:
        return f"http://{self.reach_host}:{self.http_port}"

    def port_claims(self) -> list[PortClaim]:
        claims = [PortClaim(self.port, self.host, "the scheduler's gRPC port")]
        if self.http_port is not None:
            claims.append(PortClaim(self.http_port, self.host, "the scheduler's OpenAI HTTP port (--http-port)"))
        for role, i, n in self.workers:
            worker_id = f"{role}-{i}"
            claims.append(PortClaim(self.port + n, self.host, f"{worker_id}'s gRPC port"))
            # ucxx cannot bind its listener to one address: it takes the port on every interface.
            claims.append(PortClaim(self.port + _KV_PORT_OFFSET + n, "0.0.0.0", f"{worker_id}'s KV (UCX) port"))
        if self.kvstore:
            claims.append(PortClaim(self.kvstore_port, self.host, "the KV store's gRPC port"))
            kv_port = self.kvstore_port + _KV_PORT_OFFSET
            claims.append(PortClaim(kv_port, "0.0.0.0", "the KV store's KV (UCX) port"))
        for name, n in self.metrics_ports():
            claims.append(PortClaim(self.port + _METRICS_PORT_OFFSET + n, self.host, f"{name}'s /metrics port"))
        return claims

    def metrics_ports(self) -> list[tuple[str, int]]:
        """(process name, port offset) of every /metrics endpoint; its port is port + 200 + offset."""
        stores = [(KVSTORE_ID, _KVSTORE_PORT_OFFSET)] if self.kvstore else []
        return [("scheduler", 0), *((f"{role}-{i}", n) for role, i, n in self.workers), *stores]

    def _metrics_flag(self, n: int) -> tuple[str, ...]:
        return ("--metrics-port", str(self.port + _METRICS_PORT_OFFSET + n))


def _named(process: WorkerState | KVStoreState) -> str:
    return process.worker_id if isinstance(process, WorkerState) else process.store_id


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


class Mesh:
    """The supervised processes of one mesh. Threads, not an event loop, watch them, so a mesh
    outlives any one loop (tests start it from sync code and talk to it from many loops).
    Restarts are off unless the policy says otherwise (`pdmesh up` turns them on)."""

    def __init__(
        self, spec: MeshSpec, policy: RestartPolicy | None = None, output: ProcessOutput | None = None
    ) -> None:
        self.spec = spec
        self.output = output or ProcessOutput()
        self.supervisor = Supervisor(spec.commands(), policy or RestartPolicy(restart=False), self.output)
        self.door_keys = door_keys(dict(spec.env))
        self.api_keys = self.door_keys.grpc  # what the Scheduler service asks of gRPC calls
        channel = from_env(ChannelConfig, "channel")
        # `up`'s own calls (readiness, the demo) present the scheduler's first key when no other is set.
        key = channel.api_key or (self.api_keys[0] if self.api_keys else None)
        self.client_config = dataclasses.replace(channel, api_key=key)
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def target(self) -> str:
        return f"{self.spec.reach_host}:{self.spec.port}"

    @property
    def failure(self) -> str | None:
        """Why the supervisor gave up on the mesh, once it has."""
        return self.supervisor.failure

    def start(self, timeout_s: float = 600.0) -> None:
        check_free(self.spec.port_claims(), _PORT_FIX)
        self.supervisor.start()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        """Until the scheduler lists every worker of this mesh, and its KV store, as serving."""
        want = set(self.spec.worker_ids)
        stores = {KVSTORE_ID} if self.spec.kvstore else set()
        deadline = time.monotonic() + timeout_s
        with Client(self.target, self.client_config) as client:
            while time.monotonic() < deadline:
                if self._stopping.is_set():
                    raise RuntimeError("the mesh was stopped while starting")
                if self.failure is not None:
                    raise RuntimeError(f"the mesh did not start: {self.failure}")
                with contextlib.suppress(grpc.RpcError):
                    state = client.cluster_state(timeout_s=2)
                    serving = {w.worker_id for w in state.workers if w.health is WorkerHealth.SERVING}
                    stores_serving = {s.store_id for s in state.kv_stores if s.health is WorkerHealth.SERVING}
                    if want <= serving and stores <= stores_serving:
                        return
                time.sleep(0.3)
        raise TimeoutError(f"the mesh was not ready within {timeout_s:.0f} s")

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes] | None]:
        """The latest process of each name, running or not."""
        return {name: child.process for name, child in self.supervisor.children.items()}

    def kill(self, name: str) -> None:
        """SIGKILL one process of the mesh (failure tests): no drain, no goodbye."""
        self.supervisor.kill(name)

    def restart(self, name: str, timeout_s: float = 600.0, env: tuple[tuple[str, str], ...] = ()) -> None:
        """Start a killed process again with its own command line, `env` added to its settings
        from now on (failure tests with restarts off: a worker or the store that comes back;
        benchmarks: the scheduler under another policy), and wait until the scheduler hears from
        it (the scheduler: until it lists every worker and the store again)."""
        since_ms = time.time() * 1000
        self.supervisor.restart(name, env)
        if name == "scheduler":
            self.wait_ready(timeout_s)
            return
        deadline = time.monotonic() + timeout_s
        with Client(self.target, self.client_config) as client:
            while time.monotonic() < deadline:
                if self.failure is not None:
                    raise RuntimeError(f"{name} did not come back: {self.failure}")
                with contextlib.suppress(grpc.RpcError):
                    # Its old registration can linger until the scheduler notices the death: wait
                    # for a report from the new process.
                    state = client.cluster_state(timeout_s=2)
                    heard: list[WorkerState | KVStoreState] = [*state.workers, *state.kv_stores]
                    if any(_named(p) == name and p.health is WorkerHealth.SERVING
                           and p.last_report_unix_ms > since_ms for p in heard):  # fmt: skip
                        return
                time.sleep(0.3)
        raise TimeoutError(f"{name} was not serving again within {timeout_s:.0f} s")

    def stop(self) -> None:
        """The scheduler first (its streams finish on the workers), then the workers. A second
        call (from another thread) waits for the first."""
        self._stopping.set()
        with self._stop_lock:
            groups = [["scheduler"], self.spec.worker_ids, [KVSTORE_ID] if self.spec.kvstore else []]
            self.supervisor.stop([g for g in groups if g], self.spec.grace_s + STOP_MARGIN_S)

    def kill_all(self) -> None:
        self._stopping.set()
        self.supervisor.kill_all()


@dataclass(frozen=True)
class UpOptions:
    demo_prompt: str | None = None
    exit_after_demo: bool = False
    verbose: bool = False  # every log line on the terminal, not only warnings and errors
    log_dir: Path | None = None  # None: a new directory under the system's temporary one
    restart: bool = True


async def run_up(spec: MeshSpec, options: UpOptions) -> int:
    """The mesh until Ctrl-C, SIGTERM, the end of the demo, or a process the supervisor gave up on."""
    log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="pdmesh-up-"))
    output = ProcessOutput(Echo.ALL if options.verbose else Echo.WARNINGS, log_dir)
    mesh = Mesh(spec, RestartPolicy(restart=options.restart), output)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def given_up(_reason: str) -> None:  # on a watcher thread
        loop.call_soon_threadsafe(stop.set)

    mesh.supervisor.on_give_up = given_up
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    output.note("", f"starting the mesh; every process logs to {log_dir}/")
    try:
        if not await _start(mesh, stop):
            return 130
    except Exception as e:  # a port in use, a process given up on: one clear line, no traceback
        output.note("", f"pdmesh up failed: {e}")
        return 1
    try:
        _print_banner(mesh)
        if options.demo_prompt is not None:
            await _demo(mesh.target, options.demo_prompt, mesh.client_config)
        if not options.exit_after_demo:
            print("Ctrl-C stops the mesh.", flush=True)
            await stop.wait()
        if mesh.failure is not None:
            output.note("", f"stopping the mesh: {mesh.failure}")
            return 1
        return 0
    finally:
        await _stop(mesh, output)


async def _start(mesh: Mesh, stop: asyncio.Event) -> bool:
    """Start and wait until ready; False when a signal came first (the mesh is then stopped)."""
    starting = asyncio.ensure_future(asyncio.to_thread(mesh.start))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if starting.done():
        starting.result()
        return True
    await _stop(mesh, mesh.output)  # wait_ready sees the stop and gives up
    with contextlib.suppress(Exception):
        await starting
    return False


def _print_banner(mesh: Mesh) -> None:
    spec = mesh.spec
    store = f", a KV store at {spec.reach_host}:{spec.kvstore_port}" if spec.kvstore else ""
    print(f"\npdmesh is up: scheduler at {mesh.target} ({spec.prefill} prefill, {spec.decode} decode{store}, "
          f"{spec.model} on {spec.device})")  # fmt: skip
    if spec.host in WILDCARD_HOSTS:
        print(f"listening on every interface (--host {spec.host}): anyone who reaches this machine can use it")
    else:
        print(f"listening on {spec.host} only; --host 0.0.0.0 opens the mesh to the network")
    if mesh.api_keys:
        print(f"clients must present one of {len(mesh.api_keys)} bearer keys (PDMESH_CHANNEL_API_KEY for pdmesh's own)")
    else:
        print("no bearer keys asked (PDMESH_API_KEYS sets them; do before opening the mesh to a network)")
    first, last = spec.port + _METRICS_PORT_OFFSET, spec.port + _METRICS_PORT_OFFSET + len(spec.workers)
    stores = f", the KV store's :{spec.port + _METRICS_PORT_OFFSET + _KVSTORE_PORT_OFFSET}" if spec.kvstore else ""
    print(f"metrics: http://{spec.reach_host}:{first}/metrics (scheduler) to :{last} (one port per worker{stores})")
    if spec.http_port is not None:
        print(f"OpenAI API: {spec.http_base_url}/v1 ({_http_auth(spec, mesh.door_keys.http)})")
    print(f'try:  pdmesh generate --target {mesh.target} --chat "What is the capital of France?"\n', flush=True)


def _http_auth(spec: MeshSpec, keys: tuple[str, ...]) -> str:
    """Whether the HTTP door asks for a key, as the scheduler will read its settings."""
    if keys:
        return "a key is required: Authorization: Bearer KEY, one of PDMESH_API_KEYS"
    if spec.host in WILDCARD_HOSTS:
        return "no key required, and open to the network: set PDMESH_API_KEYS"
    return f"no key required: it listens on {spec.host} only; PDMESH_API_KEYS turns keys on"


async def _stop(mesh: Mesh, output: ProcessOutput) -> None:
    """Stop in order; a second Ctrl-C (or SIGTERM) kills everything at once."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, mesh.kill_all)
    output.note("", f"stopping the mesh (streams in flight get {mesh.spec.grace_s:.0f} s; Ctrl-C again kills it)")
    try:
        await asyncio.to_thread(mesh.stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _demo(target: str, prompt: str, config: ChannelConfig) -> None:
    print(f"> {prompt}", flush=True)
    try:
        async with AsyncClient(target, config) as client:
            async for chunk in client.generate([{"role": "user", "content": prompt}], max_tokens=64):
                print(chunk.text, end="", flush=True)
                if chunk.usage is not None and chunk.placement is not None:
                    u, p = chunk.usage, chunk.placement
                    print(f"\n[{u.completion_tokens} tokens; TTFT {u.ttft_ms:.0f} ms, e2e {u.e2e_ms:.0f} ms; "
                          f"plan {p.plan.name if p.plan else '?'}]", flush=True)  # fmt: skip
    except grpc.aio.AioRpcError as e:
        print(f"\ndemo request failed: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
