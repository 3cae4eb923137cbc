"""What a prefill or decode worker needs to know: a tree loaded by pdmesh.config.from_env
(PDMESH_WORKER_* for its own fields; server, channel, engine, cache and batcher from their own
sections), with command-line flags as overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig
from kvtransfer.config import MiB, ProgressMode, TransportConfig
from pdmesh.config import ChannelConfig, ConfigError, ServerConfig, TelemetryConfig
from pdmesh.enums import WorkerRole


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
    lease_ms: int = 10_000  # an uncommitted reservation frees its blocks after this long, unless Reserve asks
    # The KV store (when the scheduler names one): a lookup is on the way to the first token, so it
    # is short; a fetch gets at most this long (and a quarter of the request's time left). An offer
    # is in the background, after the request: it may wait out a busy store's loop.
    kvstore_lookup_timeout_ms: int = 300
    kvstore_fetch_timeout_ms: int = 5_000
    kvstore_offer_timeout_ms: int = 2_000
    server: ServerConfig = field(default_factory=ServerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)  # its calls to the scheduler
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        timeouts = ("kvstore_lookup_timeout_ms", "kvstore_fetch_timeout_ms", "kvstore_offer_timeout_ms")
        for name in ("lease_ms", *timeouts, "kv_message_bytes"):
            if getattr(self, name) <= 0:
                unit = "bytes" if name.endswith("_bytes") else "milliseconds"
                raise ConfigError(name, f"is {getattr(self, name)}; use a positive number of {unit}")

    @property
    def id(self) -> str:
        return self.worker_id or f"{self.role.value}-{self.advertise_host}-{self.server.port}"

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
            progress=self.kv_progress, message_bytes=self.kv_message_bytes,
        )  # fmt: skip
