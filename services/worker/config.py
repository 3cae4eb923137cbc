"""What a prefill or decode worker needs to know, loaded by pdmesh.config.from_env
(PDMESH_WORKER_*) with command-line flags as overrides."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.config import BatcherConfig, CacheConfig, EngineConfig
from pdmesh.config import ConfigError, ServerConfig, TelemetryConfig


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class WorkerConfig:
    role: Role = Role.DECODE
    worker_id: str = ""  # empty: "<role>-<host>-<port>"
    scheduler: str = "127.0.0.1:50051"  # where to register and report load
    advertise_host: str = "127.0.0.1"  # the host other services use to reach this worker
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str | None = None
    torch_threads: int | None = None
    kv_cache_bytes: int = 256 << 20  # CPU KV pool size
    gpu_memory_fraction: float = 0.85  # CUDA KV pool, a fraction of free memory after weights
    num_kv_blocks: int | None = None  # exact pool size; overrides both (tests)
    block_size: int = 16
    max_batched_tokens: int = 2048
    max_running: int = 64
    kv_port: int = 0  # the UCX listener's port; 0 picks a free one
    lease_ms: int = 10_000  # an uncommitted reservation frees its blocks after this long
    transfer_deadline_ms: int = 30_000
    server: ServerConfig = field(default_factory=ServerConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def __post_init__(self) -> None:
        if self.lease_ms <= 0:
            raise ConfigError("lease_ms", f"is {self.lease_ms}; use a positive number of milliseconds")

    @property
    def id(self) -> str:
        return self.worker_id or f"{self.role.value}-{self.advertise_host}-{self.server.port}"

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.server.port}"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            torch_threads=self.torch_threads,
            cache=CacheConfig(
                block_size=self.block_size,
                capacity_bytes=self.kv_cache_bytes,
                gpu_memory_fraction=self.gpu_memory_fraction,
                num_blocks=self.num_kv_blocks,
            ),
            batcher=BatcherConfig(
                max_running=self.max_running,
                max_batched_tokens=self.max_batched_tokens,
                max_prefill_chunk=self.max_batched_tokens,
            ),
        )
