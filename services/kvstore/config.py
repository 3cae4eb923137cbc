"""What the KV store needs to know, loaded by pdmesh.config.from_env (PDMESH_KVSTORE_*), with
command-line flags as overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvtransfer.config import TransportConfig
from pdmesh.config import ChannelConfig, ConfigError, ServerConfig, TelemetryConfig

GiB = 1 << 30


@dataclass(frozen=True)
class TierConfig:
    """The store's tiers, per KV layout namespace: memory, then an optional disk directory."""

    memory_bytes: int = 4 * GiB  # host memory for blocks (pinned when a GPU is present)
    disk_path: Path | None = None  # None: no disk tier; blocks evicted from memory are dropped
    disk_bytes: int = 64 * GiB
    max_namespaces: int = 4  # KV layouts held at once; each has tiers of the sizes above
    shm_dir: Path | None = None  # memory in files here, mapped by workers of this host; None: private
    name: str = ""  # names the files: unique among the stores of a host


@dataclass(frozen=True)
class KVStoreConfig:
    store_id: str = ""  # empty: "kvstore-<host>-<port>"
    scheduler: str = "127.0.0.1:50051"  # where to register and report; empty: nowhere (tests)
    advertise_host: str = "127.0.0.1"  # the host workers reach the store at
    kv_port: int = 0  # the KV transfer listener's port; 0 picks a free one
    memory_bytes: int = 4 * GiB
    disk_path: Path | None = None
    disk_bytes: int = 64 * GiB
    max_namespaces: int = 4
    # The memory tier as files here (tmpfs), which workers on this host map and copy blocks
    # through instead of UCX (kvtransfer/shm.py); None (PDMESH_KVSTORE_SHARED_MEMORY_DIR=""):
    # private memory, every worker uses UCX.
    shared_memory_dir: Path | None = Path("/dev/shm")
    # How long an offered block's slot waits for the worker's push before it is given back.
    offer_lease_ms: int = 10_000
    # The KV listener's UCX transports. Both ends of a connection must wire up alike: GPU workers
    # name same-host transports, which lift the loopback lock-down (kvtransfer/config.py), so a
    # store serving them on the same host needs one too, and cuda_copy to receive from GPU memory
    # ("cuda_copy,sm,tcp,self"; `pdmesh up --device cuda` sets it). Seen on an H200: with
    # "tcp,self" UCX failed to unpack a GPU worker's address; with "sm,tcp,self" it found no
    # protocol for a rendezvous "into host memory from cuda".
    ucx_tls: str = "tcp,self"
    server: ServerConfig = field(default_factory=ServerConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)  # its calls to the scheduler
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "disk_bytes", "max_namespaces", "offer_lease_ms"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"is {getattr(self, name)}; use a positive value")

    @property
    def id(self) -> str:
        return self.store_id or f"kvstore-{self.advertise_host}-{self.server.port}"

    def tiers(self, name: str = "") -> TierConfig:
        """name: the store's, unique on its host (its files are named by it)."""
        return TierConfig(
            self.memory_bytes, self.disk_path, self.disk_bytes, self.max_namespaces, self.shared_memory_dir,
            name or self.id,
        )  # fmt: skip

    def transport(self) -> TransportConfig:
        """The store's blocks and staging buffers are host memory: tcp reaches every worker (GPU
        workers stage through their own cuda_copy)."""
        return TransportConfig(host=self.advertise_host, port=self.kv_port, device="cpu", ucx_tls=self.ucx_tls)
