"""What a prefill or decode worker needs to know: a tree loaded by pdmesh.config.from_env
(PDMESH_WORKER_* for its own fields; server, channel, engine, cache and batcher from their own
sections), with command-line flags as overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig
from kvtransfer.config import MiB, ProgressMode, TransportConfig
from pdmesh.config import ChannelConfig, ConfigError, ServerConfig, TelemetryConfig
from pdmesh.enums import WorkerRole
from services.worker.fetch_policy import FetchMode, FetchSettings


@dataclass(frozen=True)
class WorkerConfig:
    role: WorkerRole = WorkerRole.DECODE
    worker_id: str = ""  # empty: "<role>-<host>-<port>"
    scheduler: str = "127.0.0.1:50051"  # where to register and report load
    advertise_host: str = "127.0.0.1"  # the host other services use to reach this worker
    kv_port: int = 0  # the KV transfer listener's port; 0 picks a free one
    # How the KV transport's UCX thread waits for network events: THREAD_POLLING spins on a core
    # for lower latency per message; unset, it does on GPU workers only (TransportConfig.progress).
    kv_progress: ProgressMode | None = None
    kv_message_bytes: int = 32 * MiB  # a pushed request's layers travel in messages of about this size
    # GPU workers of one host write KV straight into each other's caches over CUDA IPC
    # (kvtransfer/ipc.py); off, every transfer goes over UCX (PDMESH_WORKER_KV_DIRECT_WRITES=0).
    kv_direct_writes: bool = True
    # Connect to the peers this worker may push KV to (the decode workers and the store the
    # scheduler names) before a ticket needs them, so no request pays the dial and handshake;
    # off (PDMESH_WORKER_KV_PRECONNECT=0), each connection is made by the first ticket to its peer.
    kv_preconnect: bool = True
    lease_ms: int = 10_000  # an uncommitted reservation frees its blocks after this long, unless Reserve asks
    # The KV store (when the scheduler names one): a lookup is on the way to the first token, so it
    # is short; a fetch gets at most this long (and a quarter of the request's time left). An offer
    # is in the background, after the request: it may wait out a busy store's loop.
    kvstore_lookup_timeout_ms: int = 300
    kvstore_fetch_timeout_ms: int = 5_000
    kvstore_offer_timeout_ms: int = 2_000
    # when_faster: a hit is fetched only when the store's measured speed says the fetch beats
    # computing those tokens here (services/worker/fetch_policy.py); always: every hit is fetched.
    kvstore_fetch: FetchMode = FetchMode.WHEN_FASTER
    kvstore_reprobe_ms: int = 10_000  # a store judged slower than computing is measured again after this
    # Finished blocks waiting to be offered, at most: beyond it new ones are dropped (and counted),
    # so a store that cannot keep up never makes offers pile up on the worker.
    kvstore_offer_backlog_mib: int = 1024
    # On the store's host, fetch and offer by copying through the store's memory mapped from
    # /dev/shm (services/worker/shared_memory.py) instead of UCX; false: always UCX.
    kvstore_shared_memory: bool = True
    # The GIL's switch interval (sys.setswitchinterval) in this process; 0 keeps Python's 5 ms. The
    # step thread releases the GIL at each torch call it makes between steps, and when the event loop
    # takes it then (streaming the last step's tokens), the step thread waits for it up to this long
    # while the GPU idles: on H100 meshes the prepare phase's wall time was ~2x its thread CPU time
    # (BENCHMARKS.md, "The decode step's host work"). Not yet measured on a GPU: an A/B setting.
    gil_switch_interval_ms: float = 0.0
    # A request's stream hands its tokens to the gRPC call every this many (its first token and its
    # last output at once, whatever waits with them): each message costs the event loop ~46 us of
    # GIL on a GPU decode worker (BENCHMARKS.md, "Where the event loop's ~46 us a token goes"), which
    # N divides; clients see tokens in bursts of N. 1: every token as it comes.
    stream_interval: int = 1
    server: ServerConfig = field(default_factory=ServerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)  # its calls to the scheduler
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        timeouts = ("kvstore_lookup_timeout_ms", "kvstore_fetch_timeout_ms", "kvstore_offer_timeout_ms")
        if self.gil_switch_interval_ms < 0:
            raise ConfigError("gil_switch_interval_ms", f"is {self.gil_switch_interval_ms}; use 0 (Python's) or more")
        if self.stream_interval < 1:
            raise ConfigError("stream_interval", f"is {self.stream_interval}; use 1 (every token) or more tokens")
        for name in ("lease_ms", *timeouts, "kvstore_reprobe_ms", "kvstore_offer_backlog_mib", "kv_message_bytes"):
            if getattr(self, name) <= 0:
                unit = {"bytes": "bytes", "mib": "MiB"}.get(name.rsplit("_", 1)[-1], "milliseconds")
                raise ConfigError(name, f"is {getattr(self, name)}; use a positive number of {unit}")

    @property
    def id(self) -> str:
        return self.worker_id or f"{self.role.value}-{self.advertise_host}-{self.server.port}"

    def fetch_settings(self) -> FetchSettings:
        return FetchSettings(mode=self.kvstore_fetch, reprobe_s=self.kvstore_reprobe_ms / 1000)

    def transport(self) -> TransportConfig:
        """The KV transport's config: its listener where this worker is reached, its staging
        buffers where the KV cache lives."""
        cuda = self.engine.device.startswith("cuda")
        # Same-host GPUs move KV over NVLink (cuda_ipc), their control frames (and cuda_ipc's
        # rendezvous messages) over shared memory, which is quicker than loopback tcp; hosts
        # without GPUs use tcp.
        tls = "cuda_ipc,cuda_copy,sm,tcp,self" if cuda else "tcp,self"
        return TransportConfig(
            host=self.advertise_host, port=self.kv_port, device=self.engine.device, ucx_tls=tls,
            progress=self.kv_progress, message_bytes=self.kv_message_bytes, direct_writes=self.kv_direct_writes,
            one_torch_thread=self.engine.device == "cpu",
        )  # fmt: skip
