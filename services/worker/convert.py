"""Protobuf <-> engine and kvtransfer types for the worker services: the one place they meet.

Engine types never grow to_pb/from_pb; servicers call these functions and nothing else touches
both worlds. Workers trust what the scheduler sends (it validated the request at the door): the
sampling parameters are converted, not checked again, and the engine keeps its own invariants.
"""

from __future__ import annotations

from collections.abc import Sequence

import pdmesh
from engine.block_pool import KVEvents
from engine.engine import Engine, EngineStats
from engine.request import FinishReason, RequestOutput
from engine.step_samples import StepSample
from kvtransfer.ticket import Ticket, TicketId
from pdmesh.convert import enum_from_pb, enum_to_pb
from pdmesh.convert import sampling_from_pb as sampling_from_pb  # re-exported: the servicers convert here
from pdmesh.enums import Priority
from pdmesh.v1 import common_pb2, worker_pb2
from services.worker.config import WorkerConfig


def priority_rank(priority: int) -> int:
    """The engine's priority (higher runs first) of a request's common_pb2.Priority; unset is normal."""
    level = enum_from_pb(Priority, common_pb2.Priority, priority) or Priority.NORMAL
    return level.rank


def chunk_from_output(out: RequestOutput) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(token_ids=out.new_token_ids, text=out.text_delta)
    if out.new_logprobs:
        chunk.logprobs.extend(out.new_logprobs)
    if out.finished and out.finish_reason not in (None, FinishReason.ERROR):  # an error ends the call instead
        chunk.finish.reason = enum_to_pb(out.finish_reason, common_pb2.FinishReason)  # type: ignore[assignment]
        if isinstance(out.stop, int):
            chunk.finish.stop_token_id = out.stop
        elif isinstance(out.stop, str):
            chunk.finish.stop_string = out.stop
    return chunk


def usage_of(
    out: RequestOutput, *, handed_off: bool, decode_s: float | None = None, prefill_s: float | None = None
) -> common_pb2.Usage:
    """What this worker measured of a finished request; the scheduler fills the rest. With a
    hand-off the imported tokens were transferred from a prefill worker; otherwise they came from
    the KV store, and the worker computed what neither its cache nor the store held."""
    usage = common_pb2.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens)
    if handed_off:
        usage.transferred_prompt_tokens = out.num_imported_tokens
    else:
        usage.cached_prompt_tokens = out.num_cached_tokens + out.num_imported_tokens
        usage.worker_cached_prompt_tokens = out.num_cached_tokens
        usage.store_cached_prompt_tokens = out.num_imported_tokens
        usage.computed_prompt_tokens = out.num_computed_prompt_tokens
    if out.queue_s is not None:
        usage.queue_ms = out.queue_s * 1000
    if decode_s is not None:
        usage.decode_ms = decode_s * 1000
    if prefill_s is not None:
        usage.prefill_ms = prefill_s * 1000
    return usage


def ticket_to_pb(ticket: Ticket) -> common_pb2.KVTicket:
    return common_pb2.KVTicket(
        ticket_id=ticket.ticket_id,
        kv_transfer_address=ticket.address,
        num_tokens=ticket.num_tokens,
        num_blocks=ticket.num_blocks,
        lease_expiry_unix_ms=ticket.lease_expiry_unix_ms,
        traceparent=ticket.traceparent,
    )


def ticket_from_pb(pb: common_pb2.KVTicket) -> Ticket:
    return Ticket(
        ticket_id=TicketId(pb.ticket_id),
        address=pb.kv_transfer_address,
        num_tokens=pb.num_tokens,
        num_blocks=pb.num_blocks,
        lease_expiry_unix_ms=pb.lease_expiry_unix_ms,
        traceparent=pb.traceparent,
    )


def load_report_to_pb(
    stats: EngineStats, events: KVEvents, num_reservations: int, num_transfers: int,
    steps: Sequence[StepSample] = (), pushes: Sequence[tuple[int, float]] = (),
) -> worker_pb2.ReportLoadRequest:  # fmt: skip
    """A load report's figures and samples; the reporter stamps its id, sequence, time and health."""
    return worker_pb2.ReportLoadRequest(
        num_kv_blocks_free=stats.num_free_blocks,
        num_kv_blocks_total=stats.num_blocks,
        num_running_requests=stats.num_running,
        num_waiting_requests=stats.num_waiting,
        num_kv_reservations=num_reservations,
        num_kv_transfers_in_flight=num_transfers,
        kv_cache_events=worker_pb2.KVCacheEvents(
            is_snapshot=events.snapshot, block_hashes_stored=events.stored, block_hashes_removed=events.removed
        ),
        step_samples=[step_sample_to_pb(s) for s in steps],
        push_samples=[worker_pb2.TransferSample(num_bytes=b, exposed_ms=ms) for b, ms in pushes],
    )


def step_sample_to_pb(sample: StepSample) -> worker_pb2.StepSample:
    shape = sample.shape
    return worker_pb2.StepSample(
        num_prefill_tokens=shape.num_prefill_tokens, num_prefill_attention_pairs=shape.num_prefill_attention_pairs,
        num_decode_requests=shape.num_decode_requests, num_decode_context_tokens=shape.num_decode_context_tokens,
        duration_ms=sample.duration_ms,
    )


def worker_info_to_pb(config: WorkerConfig, engine: Engine, kv_address: str, port: int) -> worker_pb2.WorkerInfo:
    layout = engine.kv_layout
    batcher = config.engine.batcher
    return worker_pb2.WorkerInfo(
        worker_id=config.id,
        role=enum_to_pb(config.role, worker_pb2.WorkerRole),  # type: ignore[arg-type]
        address=f"{config.advertise_host}:{port}",
        kv_transfer_address=kv_address,
        model=config.engine.model,
        kv_layout=common_pb2.KVLayout(
            model_fingerprint=layout.model_fingerprint, dtype=layout.dtype, block_size_tokens=layout.block_size,
            num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
            layout_version=layout.layout_version,
        ),  # fmt: skip
        capacity=worker_pb2.WorkerCapacity(
            num_kv_blocks_total=engine.pool.num_blocks, max_num_running_requests=batcher.max_running,
            max_num_batched_tokens=batcher.max_batched_tokens, max_model_len_tokens=engine.max_model_len,
        ),  # fmt: skip
        device=config.engine.device,
        version=pdmesh.__version__,
        device_id=engine.device_id,
    )
