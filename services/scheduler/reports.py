"""What workers and KV stores tell the scheduler: their registrations (fixed while they run) and
their periodic reports. Plain records; the registry (registry.py) keeps them."""

from __future__ import annotations

from dataclasses import dataclass

from engine.block_pool import KVEvents
from engine.kv_layout import KVLayout
from engine.step_samples import StepSample
from pdmesh.enums import WorkerHealth, WorkerRole
from services.kvstore.stats import StoreStatus


@dataclass(frozen=True)
class Capacity:
    num_kv_blocks_total: int = 0
    max_num_running_requests: int = 0
    max_num_batched_tokens: int = 0
    max_model_len_tokens: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker registers with; fixed while it runs."""

    worker_id: str
    role: WorkerRole | None
    address: str
    kv_transfer_address: str
    model: str
    kv_layout: KVLayout
    capacity: Capacity
    device: str = ""
    version: str = ""
    device_id: str = ""  # the physical device, shared by co-resident workers ("": shares with none)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.capacity.num_kv_blocks_total * self.kv_layout.block_size


@dataclass(frozen=True)
class LoadReport:
    """One periodic report of a worker."""

    worker_id: str
    report_seq: int = 0
    time_unix_ms: int = 0
    health: WorkerHealth | None = None
    num_kv_blocks_free: int = 0
    num_kv_blocks_total: int = 0
    num_running_requests: int = 0
    num_waiting_requests: int = 0
    num_kv_reservations: int = 0
    num_kv_transfers_in_flight: int = 0
    kv_events: KVEvents = KVEvents()
    step_samples: tuple[StepSample, ...] = ()
    transfer_samples: tuple[tuple[int, float], ...] = ()  # (bytes, exposed ms) per KV push


@dataclass(frozen=True)
class StoreInfo:
    """What a KV store registers with."""

    store_id: str
    address: str
    kv_transfer_address: str
    version: str = ""


@dataclass(frozen=True)
class StoreReport:
    store_id: str
    report_seq: int = 0
    time_unix_ms: int = 0
    health: WorkerHealth | None = None
    status: StoreStatus = StoreStatus()
    events: tuple[tuple[KVLayout, KVEvents], ...] = ()
