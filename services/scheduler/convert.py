"""Protobuf <-> the scheduler's own types, for the clients' side: the one module that reads
GenerateRequest and writes GenerateResponse, ListModels and GetClusterState answers.

A request is read here and checked by intake.accept, the check the HTTP door shares, with the
engine's own rules (SamplingParams.validate), so a request the scheduler accepts is one every
worker accepts. The workers' messages are converted in convert_workers.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from engine.errors import InvalidRequest
from pdmesh.convert import enum_from_pb, enum_to_pb, sampling_from_pb
from pdmesh.enums import Priority, WorkerHealth
from pdmesh.v1 import common_pb2, scheduler_pb2, worker_pb2
from services.scheduler.convert_workers import (
    load_to_pb,
    step_model_to_pb,
    store_info_to_pb,
    store_status_to_pb,
    worker_info_to_pb,
)
from services.scheduler.intake import ChatMessage, ChatPrompt, ClientRequest, Prompt, TextPrompt, TokenPrompt
from services.scheduler.registry import Registry, Store, Worker
from services.scheduler.request import PlacementReport, Response, Slo, TokenChunk, Usage

_ROLES: dict[int, str] = {
    common_pb2.CHAT_ROLE_SYSTEM: "system",
    common_pb2.CHAT_ROLE_USER: "user",
    common_pb2.CHAT_ROLE_ASSISTANT: "assistant",
    common_pb2.CHAT_ROLE_TOOL: "tool",
}


def request_from_pb(request: scheduler_pb2.GenerateRequest) -> ClientRequest:
    """The gRPC door's reading of a request; intake.accept checks it."""
    return ClientRequest(
        prompt=prompt_from_pb(request.prompt),
        sampling=sampling_from_pb(request.sampling),
        model=request.model,
        request_id=request.request_id,
        slo=Slo(ttft_ms=request.slo.ttft_ms, tpot_ms=request.slo.tpot_ms),
        priority=_priority(request.priority),
    )


def prompt_from_pb(prompt: common_pb2.Prompt) -> Prompt:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return TextPrompt(prompt.text, field="prompt.text")
    if kind == "token_ids":
        return TokenPrompt(tuple(prompt.token_ids.ids), field="prompt.token_ids")
    if kind == "chat":
        messages = (ChatMessage(_role(m.role, i), m.content) for i, m in enumerate(prompt.chat.messages))
        return ChatPrompt(tuple(messages), field="prompt.chat.messages")
    raise InvalidRequest("prompt", "is not set", "set one of prompt.text, prompt.token_ids or prompt.chat")


def _role(role: int, index: int) -> str:
    if role not in _ROLES:
        problem = "is unset" if role == common_pb2.CHAT_ROLE_UNSPECIFIED else f"is {role}, no role this scheduler knows"
        raise InvalidRequest(f"prompt.chat.messages[{index}].role", problem, "use system, user, assistant or tool")
    return _ROLES[role]


def _priority(value: int) -> Priority:
    """Unset is normal; a value no one defined (proto3 enums take any int) is refused, not guessed."""
    if value == common_pb2.PRIORITY_UNSPECIFIED:
        return Priority.NORMAL
    priority = enum_from_pb(Priority, common_pb2.Priority, value)
    if priority is None:
        raise InvalidRequest("priority", f"is {value}, no priority this scheduler knows", "use LOW, NORMAL or HIGH")
    return priority


def response_to_pb(response: Response) -> scheduler_pb2.GenerateResponse:
    pb = scheduler_pb2.GenerateResponse(request_id=response.request_id, chunk=chunk_to_pb(response.chunk))
    if response.usage is not None:
        pb.usage.CopyFrom(usage_to_pb(response.usage))
    if response.placement is not None:
        pb.placement.CopyFrom(placement_to_pb(response.placement))
    return pb


def chunk_to_pb(chunk: TokenChunk) -> common_pb2.TokenChunk:
    pb = common_pb2.TokenChunk(token_ids=chunk.token_ids, logprobs=chunk.logprobs, text=chunk.text)
    finish = chunk.finish
    if finish is not None:
        pb.finish.reason = enum_to_pb(finish.reason, common_pb2.FinishReason)  # type: ignore[assignment]
        if finish.stop_token_id is not None:
            pb.finish.stop_token_id = finish.stop_token_id
        elif finish.stop_string is not None:
            pb.finish.stop_string = finish.stop_string
    return pb


def usage_to_pb(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(**dataclasses.asdict(usage))


def placement_to_pb(placement: PlacementReport) -> scheduler_pb2.Placement:
    plan = enum_to_pb(placement.plan, scheduler_pb2.ExecutionPlan) if placement.plan is not None else 0
    return scheduler_pb2.Placement(
        plan=plan,  # type: ignore[arg-type]
        prefill_worker_id=placement.prefill_worker_id,
        decode_worker_id=placement.decode_worker_id,
        num_decode_failovers=placement.num_decode_failovers,
    )


def model_info_to_pb(
    name: str, workers: Iterable[Worker], max_model_len: int | None, num_prefill: int, num_decode: int
) -> scheduler_pb2.ModelInfo:
    fingerprint = next((w.info.kv_layout.model_fingerprint for w in workers), "")
    return scheduler_pb2.ModelInfo(
        name=name, model_fingerprint=fingerprint, max_model_len_tokens=max_model_len or 0,
        num_prefill_workers=num_prefill, num_decode_workers=num_decode,
    )  # fmt: skip


def worker_state_to_pb(worker: Worker, health: WorkerHealth) -> scheduler_pb2.WorkerState:
    last_report_unix_ms = worker.load.time_unix_ms if worker.load is not None else 0
    state = scheduler_pb2.WorkerState(
        info=worker_info_to_pb(worker.info),
        health=enum_to_pb(health, worker_pb2.WorkerHealth),  # type: ignore[arg-type]
        last_report_unix_ms=last_report_unix_ms,
        num_assigned_requests=worker.assigned,
        step_model=step_model_to_pb(
            worker.predictors.step, worker.predictors.num_step_samples, worker.predictors.relative_error
        ),
        transfer_model=worker_pb2.TransferModel(
            fixed_ms=worker.predictors.transfer.fixed_ms, per_mib_ms=worker.predictors.transfer.ms_per_mib,
            num_samples=worker.predictors.num_transfer_samples,
        ),
    )  # fmt: skip
    if worker.load is not None:
        state.load.CopyFrom(load_to_pb(worker.load))
    return state



def store_state_to_pb(store: Store, registry: Registry) -> scheduler_pb2.KVStoreState:
    state = scheduler_pb2.KVStoreState(
        info=store_info_to_pb(store.info),
        health=enum_to_pb(registry.store_health(store), worker_pb2.WorkerHealth),  # type: ignore[arg-type]
        num_indexed_blocks=registry.index.num_blocks(store.store_id),
    )
    if store.report is not None:
        state.status.CopyFrom(store_status_to_pb(store.report.status))
        state.last_report_unix_ms = store.report.time_unix_ms
    return state
