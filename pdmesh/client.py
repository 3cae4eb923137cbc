"""The pdmesh client library: talk to the scheduler without touching protobuf.

    async with AsyncClient("localhost:50051") as client:
        async for chunk in client.generate("Tell me a story", max_tokens=32, ttft_ms=500):
            print(chunk.text, end="")

`Client` is the same API, blocking. Prompts are text, token ids, or chat messages; sampling
fields are those of engine.sampling_params.SamplingParams, given as keywords or as one object.
Every protobuf message is converted to or from the small dataclasses below in this module and
nowhere else. Errors arrive as grpc.RpcError with the status code and a message naming the field;
a refusal (RESOURCE_EXHAUSTED: no plan meets the SLO now) says when to try again, which
`retry_after_s(error)` reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.sampling_params import SamplingParams
from pdmesh.channel import call_metadata, channel, sync_channel
from pdmesh.config import ChannelConfig, from_env
from pdmesh.convert import enum_from_pb, enum_to_pb, layout_from_pb, sampling_to_pb
from pdmesh.enums import ExecutionPlan, FinishReason, Priority, WorkerHealth, WorkerRole  # re-exported: the client API
from pdmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2


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


# ---- to protobuf ----------------------------------------------------------------------------


def prompt_to_pb(prompt: PromptInput) -> common_pb2.Prompt:
    """Text, token ids or chat messages (ChatMessage or {"role": ..., "content": ...})."""
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    items = list(prompt)
    if not items:
        raise ValueError("prompt: is empty; pass text, token ids or at least one chat message")
    ids = [t for t in items if isinstance(t, int)]
    if len(ids) == len(items):
        return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))
    messages = [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in items]  # type: ignore[index]
    return common_pb2.Prompt(
        chat=common_pb2.ChatMessages(messages=[_chat_message_to_pb(m) for m in messages])
    )


def _chat_message_to_pb(message: ChatMessage) -> common_pb2.ChatMessage:
    name = f"CHAT_ROLE_{message.role.upper()}"
    if name not in common_pb2.ChatRole.DESCRIPTOR.values_by_name or name.endswith("UNSPECIFIED"):
        raise ValueError(f"role: is {message.role!r}; use system, user, assistant or tool")
    return common_pb2.ChatMessage(role=common_pb2.ChatRole.Value(name), content=message.content)


def generate_request(
    prompt: PromptInput,
    *,
    model: str = "",
    sampling: SamplingParams | None = None,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
    priority: Priority = Priority.NORMAL,
    request_id: str = "",
    **sampling_fields: Any,
) -> scheduler_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; sampling_fields override fields of `sampling`."""
    sampling = dataclasses.replace(sampling or SamplingParams(), **sampling_fields)
    return scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt=prompt_to_pb(prompt),
        sampling=sampling_to_pb(sampling),
        slo=common_pb2.Slo(ttft_ms=ttft_ms or 0.0, tpot_ms=tpot_ms or 0.0),
        priority=enum_to_pb(priority, common_pb2.Priority),  # type: ignore[arg-type]
    )


# ---- from protobuf --------------------------------------------------------------------------

def _fields(cls: type, message: Any) -> dict[str, Any]:
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(cls)}


def chunk_from_pb(response: scheduler_pb2.GenerateResponse) -> Chunk:
    chunk = response.chunk
    last = chunk.HasField("finish")
    placement = response.placement
    return Chunk(
        request_id=response.request_id,
        token_ids=tuple(chunk.token_ids),
        text=chunk.text,
        logprobs=tuple(chunk.logprobs),
        finish_reason=enum_from_pb(FinishReason, common_pb2.FinishReason, chunk.finish.reason) if last else None,
        usage=Usage(**_fields(Usage, response.usage)) if response.HasField("usage") else None,
        placement=Placement(
            plan=enum_from_pb(ExecutionPlan, scheduler_pb2.ExecutionPlan, placement.plan),
            prefill_worker_id=placement.prefill_worker_id,
            decode_worker_id=placement.decode_worker_id,
            num_decode_failovers=placement.num_decode_failovers,
        )
        if response.HasField("placement")
        else None,
    )


def models_from_pb(response: scheduler_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(**_fields(ModelInfo, m)) for m in response.models]


def cluster_state_from_pb(response: scheduler_pb2.GetClusterStateResponse) -> ClusterState:
    def worker(w: scheduler_pb2.WorkerState) -> WorkerState:
        load = w.load
        return WorkerState(
            worker_id=w.info.worker_id,
            role=enum_from_pb(WorkerRole, worker_pb2.WorkerRole, w.info.role),
            address=w.info.address,
            model=w.info.model,
            health=enum_from_pb(WorkerHealth, worker_pb2.WorkerHealth, w.health),
            num_kv_blocks_free=load.num_kv_blocks_free,
            num_kv_blocks_total=load.num_kv_blocks_total,
            num_running_requests=load.num_running_requests,
            num_waiting_requests=load.num_waiting_requests,
            num_kv_reservations=load.num_kv_reservations,
            num_kv_transfers_in_flight=load.num_kv_transfers_in_flight,
            num_assigned_requests=w.num_assigned_requests,
            last_report_unix_ms=w.last_report_unix_ms,
            step_model=StepFit(**_fields(StepFit, w.step_model)),
            transfer_model=TransferFit(**_fields(TransferFit, w.transfer_model)),
            kv_bytes_per_token=layout_from_pb(w.info.kv_layout).bytes_per_token,
            kv_capacity_tokens=w.info.capacity.num_kv_blocks_total * w.info.kv_layout.block_size_tokens,
            max_num_batched_tokens=w.info.capacity.max_num_batched_tokens,
            max_num_running_requests=w.info.capacity.max_num_running_requests,
        )

    def store(s: scheduler_pb2.KVStoreState) -> KVStoreState:
        known = {"store_id", "address", "health", "last_report_unix_ms", "num_indexed_blocks"}
        return KVStoreState(
            store_id=s.info.store_id, address=s.info.address,
            health=enum_from_pb(WorkerHealth, worker_pb2.WorkerHealth, s.health),
            last_report_unix_ms=s.last_report_unix_ms, num_indexed_blocks=s.num_indexed_blocks,
            **{f.name: getattr(s.status, f.name) for f in dataclasses.fields(KVStoreState) if f.name not in known},
        )  # fmt: skip

    return ClusterState(
        time_unix_ms=response.time_unix_ms,
        policy=response.policy,
        num_queued_requests=response.num_queued_requests,
        num_running_requests=response.num_running_requests,
        workers=tuple(worker(w) for w in response.workers),
        kv_stores=tuple(store(s) for s in response.kv_stores),
    )


def retry_after_s(error: grpc.RpcError) -> float | None:
    """When the server said to retry a refused call (a google.rpc.RetryInfo in the status details),
    in seconds; None when it did not say."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


# ---- clients --------------------------------------------------------------------------------


class AsyncClient:
    """asyncio client of the scheduler. Use as `async with AsyncClient(target) as client:`.
    config: TLS files, limits and the bearer key (api_key); None takes them from PDMESH_CHANNEL_*
    (plain text, no key when unset)."""

    def __init__(self, target: str, config: ChannelConfig | None = None) -> None:
        config = config if config is not None else from_env(ChannelConfig, "channel")
        self._channel = channel(target, config)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._metadata = call_metadata(config)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any
    ) -> AsyncIterator[Chunk]:
        """Stream the continuation of `prompt`. options: model, sampling, ttft_ms, tpot_ms,
        priority, request_id (see generate_request) and SamplingParams fields. Leaving the loop
        early cancels the request in the mesh."""
        call = self._stub.Generate(generate_request(prompt, **options), timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                yield chunk_from_pb(response)
        finally:
            call.cancel()

    async def complete(
        self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any
    ) -> Completion:
        """The whole generation at once."""
        return Completion.collect([c async for c in self.generate(prompt, timeout_s=timeout_s, **options)])

    async def list_models(self, *, timeout_s: float | None = 10.0) -> list[ModelInfo]:
        return models_from_pb(
            await self._stub.ListModels(scheduler_pb2.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata)
        )

    async def cluster_state(self, *, timeout_s: float | None = 10.0) -> ClusterState:
        request = scheduler_pb2.GetClusterStateRequest()
        response = await self._stub.GetClusterState(request, timeout=timeout_s, metadata=self._metadata)
        return cluster_state_from_pb(response)


class Client:
    """Blocking client of the scheduler; the same API as AsyncClient."""

    def __init__(self, target: str, config: ChannelConfig | None = None) -> None:
        config = config if config is not None else from_env(ChannelConfig, "channel")
        self._channel = sync_channel(target, config)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._metadata = call_metadata(config)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any
    ) -> Iterator[Chunk]:
        call = self._stub.Generate(generate_request(prompt, **options), timeout=timeout_s, metadata=self._metadata)
        try:
            for response in call:
                yield chunk_from_pb(response)
        finally:
            call.cancel()

    def complete(self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any) -> Completion:
        return Completion.collect(self.generate(prompt, timeout_s=timeout_s, **options))

    def list_models(self, *, timeout_s: float | None = 10.0) -> list[ModelInfo]:
        request = scheduler_pb2.ListModelsRequest()
        return models_from_pb(self._stub.ListModels(request, timeout=timeout_s, metadata=self._metadata))

    def cluster_state(self, *, timeout_s: float | None = 10.0) -> ClusterState:
        request = scheduler_pb2.GetClusterStateRequest()
        return cluster_state_from_pb(self._stub.GetClusterState(request, timeout=timeout_s, metadata=self._metadata))
