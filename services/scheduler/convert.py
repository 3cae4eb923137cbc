"""Protobuf <-> the scheduler's own types, for the clients' side: the one module that reads
GenerateRequest and writes GenerateResponse, ListModels and GetClusterState answers.

Validation happens here, at the door, with the engine's own rules (SamplingParams.validate) so a
request the scheduler accepts is one every worker accepts. The workers' messages are converted in
convert_workers.py.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Iterable

from engine.errors import InvalidRequest
from engine.tokenizer import Tokenizer
from pdmesh.convert import enum_from_pb, enum_to_pb, sampling_from_pb
from pdmesh.enums import Priority, WorkerHealth
from pdmesh.v1 import common_pb2, scheduler_pb2, worker_pb2
from services.scheduler.convert_workers import load_to_pb, store_info_to_pb, store_status_to_pb, worker_info_to_pb
from services.scheduler.registry import Registry, Store, Worker
from services.scheduler.request import PlacementReport, Response, SchedulerRequest, Slo, TokenChunk, Usage

_ROLES: dict[int, str] = {
    common_pb2.CHAT_ROLE_SYSTEM: "system",
    common_pb2.CHAT_ROLE_USER: "user",
    common_pb2.CHAT_ROLE_ASSISTANT: "assistant",
    common_pb2.CHAT_ROLE_TOOL: "tool",
}
_seeds = random.SystemRandom()


def request_from_pb(
    request: scheduler_pb2.GenerateRequest, tokenizer: Tokenizer, max_prompt_bytes: int
) -> SchedulerRequest:
    """Blocking (tokenization): call it off the event loop."""
    check_prompt_size(request.prompt, max_prompt_bytes)
    prompt = prompt_ids(request.prompt, tokenizer)
    sampling = sampling_from_pb(request.sampling)
    sampling.validate(tokenizer.vocab_size)
    if sampling.seed is None:
        # Drawn here so that any worker continuing this request draws the same tokens.
        sampling = dataclasses.replace(sampling, seed=_seeds.getrandbits(63))
    return SchedulerRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt),
        sampling=sampling,
        slo=Slo(ttft_ms=request.slo.ttft_ms, tpot_ms=request.slo.tpot_ms),
        priority=enum_from_pb(Priority, common_pb2.Priority, request.priority) or Priority.NORMAL,
    )


def check_prompt_size(prompt: common_pb2.Prompt, max_bytes: int) -> None:
    """Refuse text longer than `max_bytes` of UTF-8 before anything tokenizes it."""
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        field, texts = "prompt.text", [prompt.text]
    elif kind == "chat":
        field, texts = "prompt.chat.messages", [m.content for m in prompt.chat.messages]
    else:
        return
    # Characters never outnumber bytes: only a text that might fit is encoded to be measured.
    size = sum(len(t) for t in texts)
    if size <= max_bytes:
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if size > max_bytes:
        raise InvalidRequest(
            field, f"is {size} bytes or more, over the scheduler's limit of {max_bytes} (max_prompt_bytes)",
            "send a shorter prompt",
        )  # fmt: skip


def prompt_ids(prompt: common_pb2.Prompt, tokenizer: Tokenizer) -> list[int]:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        if not prompt.text:
            raise InvalidRequest("prompt.text", "is empty", "send some text, token ids or chat messages")
        ids = tokenizer.encode(prompt.text, add_special_tokens=True)  # BOS where the model expects one
    elif kind == "token_ids":
        ids = list(prompt.token_ids.ids)
        vocab = tokenizer.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest("prompt.token_ids", f"contains {bad}", f"use ids below the vocabulary size {vocab}")
    elif kind == "chat":
        messages = [{"role": _role(m.role, i), "content": m.content} for i, m in enumerate(prompt.chat.messages)]
        if not messages:
            raise InvalidRequest("prompt.chat", "has no messages", "send at least one message")
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    else:
        raise InvalidRequest("prompt", "is not set", "set one of prompt.text, prompt.token_ids or prompt.chat")
    if not ids:
        raise InvalidRequest("prompt", "has no tokens", "send a non-empty prompt")
    return ids


def _role(role: int, index: int) -> str:
    if role not in _ROLES:
        raise InvalidRequest(f"prompt.chat.messages[{index}].role", "is unset", "use system, user, assistant or tool")
    return _ROLES[role]


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
    )
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
