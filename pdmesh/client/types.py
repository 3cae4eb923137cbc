"""What the client library hands its callers: frozen dataclasses for chunks, completions, usage,
placements and the cluster's state. No protobuf here (pdmesh/client/convert.py builds these)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pdmesh.enums import ExecutionPlan, FinishReason, WorkerHealth, WorkerRole


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool"
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    queue_ms: float
    prefill_ms: float
    transfer_ms: float
    ttft_ms: float
    decode_ms: float
    e2e_ms: float
    transfer_bytes: int
    schedule_ms: float = 0.0  # arrival until the prompt went to the worker computing it
    transfer_overlap_ms: float = 0.0  # KV transfer hidden behind prefill compute
    computed_prompt_tokens: int = 0  # computed for this request (cached + computed = prompt)
    worker_cached_prompt_tokens: int = 0  # of cached_prompt_tokens: the prefilling worker's own cache
    store_cached_prompt_tokens: int = 0  # of cached_prompt_tokens: fetched from the KV store
    transferred_prompt_tokens: int = 0  # pushed from a prefill worker to the decode worker

    @property
    def tpot_ms(self) -> float:
        """Mean time per output token after the first."""
        return self.decode_ms / (self.completion_tokens - 1) if self.completion_tokens > 1 else 0.0


@dataclass(frozen=True)
class Placement:
    plan: ExecutionPlan | None
    prefill_worker_id: str
    decode_worker_id: str
    num_decode_failovers: int


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of output; finish_reason, usage and placement are set on the last."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    placement: Placement | None = None


@dataclass(frozen=True)
class Completion:
    """A whole generation, collected from its chunks."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage | None
    placement: Placement | None

    @classmethod
    def collect(cls, chunks: Iterable[Chunk]) -> Completion:
        chunks = list(chunks)
        last = chunks[-1]
        return cls(
            request_id=last.request_id,
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=last.finish_reason,
            usage=last.usage,
            placement=last.placement,
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    model_fingerprint: str
    max_model_len_tokens: int
    num_prefill_workers: int
    num_decode_workers: int


@dataclass(frozen=True)
class StepFit:
    """The scheduler's step-time model of a worker (worker.proto StepModel): a step's predicted ms
    is fixed_ms plus each per-unit cost times the step's count of that unit."""

    fixed_ms: float = 0.0
    per_prefill_token_ms: float = 0.0
    per_attention_pair_ms: float = 0.0
    per_decode_request_ms: float = 0.0
    per_decode_context_token_ms: float = 0.0
    num_samples: int = 0
    rms_relative_error: float = 0.0


@dataclass(frozen=True)
class TransferFit:
    """The scheduler's model of a worker's KV pushes: exposed ms = fixed_ms + per_mib_ms * MiB."""

    fixed_ms: float = 0.0
    per_mib_ms: float = 0.0
    num_samples: int = 0


@dataclass(frozen=True)
class WorkerState:
    worker_id: str
    role: WorkerRole | None
    address: str
    model: str
    health: WorkerHealth | None
    num_kv_blocks_free: int
    num_kv_blocks_total: int
    num_running_requests: int
    num_waiting_requests: int
    num_kv_reservations: int
    num_kv_transfers_in_flight: int
    num_assigned_requests: int
    last_report_unix_ms: int
    step_model: StepFit = StepFit()
    transfer_model: TransferFit = TransferFit()
    kv_bytes_per_token: int = 0  # from its KV layout
    kv_capacity_tokens: int = 0
    max_num_batched_tokens: int = 0
    max_num_running_requests: int = 0
    device_id: str = ""  # the physical device it computes on, shared by co-resident workers ("": none named)


@dataclass(frozen=True)
class KVStoreState:
    """A KV store as the scheduler last heard from it: capacity (per KV layout namespace), use,
    and what it did since it started."""

    store_id: str
    address: str
    health: WorkerHealth | None
    last_report_unix_ms: int
    num_indexed_blocks: int  # blocks the scheduler's prefix index lists in the store
    memory_capacity_bytes: int
    memory_used_bytes: int
    disk_capacity_bytes: int
    disk_used_bytes: int
    num_namespaces: int
    num_memory_blocks: int
    num_disk_blocks: int
    num_lookups: int
    num_lookup_blocks: int
    num_lookup_hit_blocks: int
    num_fetches: int
    num_fetched_blocks: int
    num_fetches_refused: int
    num_fetches_failed: int
    num_fetches_in_flight: int
    num_offers: int
    num_stored_blocks: int
    num_demoted_blocks: int
    num_promoted_blocks: int
    num_evicted_blocks: int
    num_restored_blocks: int
    shared_memory: bool  # the memory tier is a file (/dev/shm by default) the workers of its host map
    num_leases: int  # shared-memory fetches and offers under way
    num_leases_expired: int  # shared-memory fetches and offers whose worker neither released nor committed


@dataclass(frozen=True)
class ClusterState:
    time_unix_ms: int
    policy: str
    num_queued_requests: int
    num_running_requests: int
    workers: tuple[WorkerState, ...]
    kv_stores: tuple[KVStoreState, ...] = ()

    def worker(self, worker_id: str) -> WorkerState:
        return next(w for w in self.workers if w.worker_id == worker_id)


PromptInput = str | Sequence[int] | Sequence[ChatMessage | Mapping[str, str]]
