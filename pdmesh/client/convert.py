"""The client library's wire end: its arguments to protobuf requests, and responses to the
dataclasses of pdmesh/client/types.py. Every protobuf message the client sees passes here."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from engine.sampling_params import SamplingParams
from pdmesh.client.types import (
    ChatMessage,
    Chunk,
    ClusterState,
    KVStoreState,
    ModelInfo,
    Placement,
    PromptInput,
    StepFit,
    TransferFit,
    Usage,
    WorkerState,
)
from pdmesh.convert import enum_from_pb, enum_to_pb, layout_from_pb, sampling_to_pb
from pdmesh.enums import ExecutionPlan, FinishReason, Priority, WorkerHealth, WorkerRole
from pdmesh.v1 import common_pb2, scheduler_pb2, worker_pb2


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
            device_id=w.info.device_id,
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
