"""Protobuf <-> the scheduler's own types, for the workers' side: registration, load reports, and
the calls the scheduler makes to prefill and decode workers."""

from __future__ import annotations

import dataclasses

from engine.block_pool import KVEvents
from engine.ids import BlockHash
from engine.step_samples import StepSample, StepShape
from pdmesh.convert import enum_from_pb, enum_to_pb, layout_from_pb, layout_to_pb, sampling_to_pb
from pdmesh.enums import FinishReason, WorkerHealth, WorkerRole
from pdmesh.v1 import common_pb2, decode_pb2, kvstore_pb2, prefill_pb2, worker_pb2
from services.kvstore.stats import StoreCounters, StoreStatus
from services.scheduler.predictor import StepModel
from services.scheduler.reports import Capacity, LoadReport, StoreInfo, StoreReport, WorkerInfo
from services.scheduler.request import Decoded, Finish, Prefilled, SchedulerRequest, TicketHandle, TokenChunk, Usage

# ---- registration and load reports


def worker_info_from_pb(pb: worker_pb2.WorkerInfo) -> WorkerInfo:
    c = pb.capacity
    return WorkerInfo(
        worker_id=pb.worker_id,
        role=enum_from_pb(WorkerRole, worker_pb2.WorkerRole, pb.role),
        address=pb.address,
        kv_transfer_address=pb.kv_transfer_address,
        model=pb.model,
        kv_layout=layout_from_pb(pb.kv_layout),
        capacity=Capacity(
            c.num_kv_blocks_total, c.max_num_running_requests, c.max_num_batched_tokens, c.max_model_len_tokens
        ),
        device=pb.device,
        version=pb.version,
        device_id=pb.device_id,
    )


def worker_info_to_pb(info: WorkerInfo) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(
        worker_id=info.worker_id,
        role=enum_to_pb(info.role, worker_pb2.WorkerRole) if info.role is not None else 0,  # type: ignore[arg-type]
        address=info.address,
        kv_transfer_address=info.kv_transfer_address,
        model=info.model,
        kv_layout=layout_to_pb(info.kv_layout),
        capacity=worker_pb2.WorkerCapacity(**dataclasses.asdict(info.capacity)),
        device=info.device,
        version=info.version,
        device_id=info.device_id,
    )


_LOAD_COUNTS = (
    "num_kv_blocks_free", "num_kv_blocks_total", "num_running_requests", "num_waiting_requests",
    "num_kv_reservations", "num_kv_transfers_in_flight",
)  # fmt: skip


def load_from_pb(pb: worker_pb2.ReportLoadRequest) -> LoadReport:
    events = pb.kv_cache_events
    return LoadReport(
        worker_id=pb.worker_id,
        report_seq=pb.report_seq,
        time_unix_ms=pb.time_unix_ms,
        health=enum_from_pb(WorkerHealth, worker_pb2.WorkerHealth, pb.health),
        kv_events=events_from_pb(events),
        step_samples=tuple(step_sample_from_pb(s) for s in pb.step_samples),
        transfer_samples=tuple((s.num_bytes, s.exposed_ms) for s in pb.push_samples),
        **{name: getattr(pb, name) for name in _LOAD_COUNTS},
    )


def step_sample_from_pb(pb: worker_pb2.StepSample) -> StepSample:
    shape = StepShape(
        pb.num_prefill_tokens, pb.num_prefill_attention_pairs, pb.num_decode_requests, pb.num_decode_context_tokens
    )
    return StepSample(shape, pb.duration_ms)


def step_model_to_pb(model: StepModel, num_samples: int, relative_error: float) -> worker_pb2.StepModel:
    c = model.coefficients  # ms per unit
    return worker_pb2.StepModel(
        fixed_ms=c[0], per_prefill_token_ms=c[1], per_attention_pair_ms=c[2], per_decode_request_ms=c[3],
        per_decode_context_token_ms=c[4], num_samples=num_samples, rms_relative_error=relative_error,
    )


def load_to_pb(load: LoadReport) -> worker_pb2.ReportLoadRequest:
    """The report as GetClusterState shows it: its cache events and samples left out."""
    health = enum_to_pb(load.health, worker_pb2.WorkerHealth) if load.health is not None else 0
    return worker_pb2.ReportLoadRequest(
        worker_id=load.worker_id, report_seq=load.report_seq, time_unix_ms=load.time_unix_ms,
        health=health,  # type: ignore[arg-type]
        **{name: getattr(load, name) for name in _LOAD_COUNTS},
    )  # fmt: skip


def events_from_pb(events: worker_pb2.KVCacheEvents) -> KVEvents:
    return KVEvents(
        snapshot=events.is_snapshot,
        stored=tuple(BlockHash(h) for h in events.block_hashes_stored),
        removed=tuple(BlockHash(h) for h in events.block_hashes_removed),
    )


# ---- KV stores


def store_info_from_pb(pb: worker_pb2.KVStoreInfo) -> StoreInfo:
    return StoreInfo(pb.store_id, pb.address, pb.kv_transfer_address, pb.version)


def store_info_to_pb(info: StoreInfo) -> worker_pb2.KVStoreInfo:
    return worker_pb2.KVStoreInfo(**dataclasses.asdict(info))


def store_report_from_pb(pb: worker_pb2.ReportKVStoreRequest) -> StoreReport:
    return StoreReport(
        store_id=pb.store_id, report_seq=pb.report_seq, time_unix_ms=pb.time_unix_ms,
        health=enum_from_pb(WorkerHealth, worker_pb2.WorkerHealth, pb.health),
        status=store_status_from_pb(pb.status),
        events=tuple((layout_from_pb(e.kv_layout), events_from_pb(e.events)) for e in pb.events),
    )  # fmt: skip


def store_status_from_pb(pb: kvstore_pb2.KVStoreStatus) -> StoreStatus:
    counters = StoreCounters(**{f.name: getattr(pb, f"num_{f.name}") for f in dataclasses.fields(StoreCounters)})
    fields = {f.name: getattr(pb, f.name) for f in dataclasses.fields(StoreStatus) if f.name != "counters"}
    return StoreStatus(**fields, counters=counters)


def store_status_to_pb(status: StoreStatus) -> kvstore_pb2.KVStoreStatus:
    counters = {f"num_{name}": value for name, value in dataclasses.asdict(status.counters).items()}
    fields = {f.name: getattr(status, f.name) for f in dataclasses.fields(status) if f.name != "counters"}
    return kvstore_pb2.KVStoreStatus(**fields, **counters)


# ---- calls to workers


def reserve_to_pb(request: SchedulerRequest, lease_ms: int) -> decode_pb2.ReserveRequest:
    return decode_pb2.ReserveRequest(
        request_id=request.request_id, num_tokens=request.num_prompt_tokens, lease_ms=lease_ms
    )


def ticket_from_pb(reply: decode_pb2.ReserveResponse) -> TicketHandle:
    return TicketHandle(reply.ticket.ticket_id, reply.ticket.SerializeToString())


def prefill_to_pb(request: SchedulerRequest, ticket: TicketHandle) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        sampling=sampling_to_pb(request.sampling),
        ticket=common_pb2.KVTicket.FromString(ticket.encoded),
        priority=enum_to_pb(request.priority, common_pb2.Priority),  # type: ignore[arg-type]
    )


def prefilled_from_pb(pb: prefill_pb2.PrefillResponse, num_prompt_tokens: int) -> Prefilled:
    """The prefill worker's answer; an OK answer means every prompt token's KV reached the decode worker."""
    cached = min(pb.cached_prompt_tokens, num_prompt_tokens)
    usage = Usage(
        cached_prompt_tokens=cached, worker_cached_prompt_tokens=cached - min(pb.store_cached_prompt_tokens, cached),
        store_cached_prompt_tokens=min(pb.store_cached_prompt_tokens, cached),
        computed_prompt_tokens=num_prompt_tokens - cached, transferred_prompt_tokens=num_prompt_tokens,
        queue_ms=pb.queue_ms, prefill_ms=pb.prefill_ms, transfer_ms=pb.transfer_ms,
        transfer_overlap_ms=pb.transfer_overlap_ms, transfer_bytes=pb.transfer_bytes,
    )  # fmt: skip
    return Prefilled(chunk_from_pb(pb.chunk), usage)


def decode_to_pb(
    request: SchedulerRequest, outputs: list[int], ticket: TicketHandle | None
) -> decode_pb2.DecodeGenerateRequest:
    pb = decode_pb2.DecodeGenerateRequest(
        request_id=request.request_id, prompt_token_ids=request.prompt_token_ids, output_token_ids=outputs,
        sampling=sampling_to_pb(request.sampling),
        priority=enum_to_pb(request.priority, common_pb2.Priority),  # type: ignore[arg-type]
    )  # fmt: skip
    if ticket is None:
        pb.local_prefill.SetInParent()
    else:
        pb.ticket_id = ticket.ticket_id
    return pb


def decoded_from_pb(pb: decode_pb2.DecodeGenerateResponse) -> Decoded:
    usage = Usage(**{f.name: getattr(pb.usage, f.name) for f in dataclasses.fields(Usage)})
    return Decoded(chunk_from_pb(pb.chunk), usage if pb.HasField("usage") else None)


def chunk_from_pb(pb: common_pb2.TokenChunk) -> TokenChunk:
    finish = None
    if pb.HasField("finish"):
        matched = pb.finish.WhichOneof("matched")
        finish = Finish(
            reason=enum_from_pb(FinishReason, common_pb2.FinishReason, pb.finish.reason) or FinishReason.STOP,
            stop_token_id=pb.finish.stop_token_id if matched == "stop_token_id" else None,
            stop_string=pb.finish.stop_string if matched == "stop_string" else None,
        )
    return TokenChunk(tuple(pb.token_ids), pb.text, tuple(pb.logprobs), finish)
