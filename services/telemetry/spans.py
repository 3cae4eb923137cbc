"""The spans of one request: their stable names, their attribute keys, and small helpers.

A request's trace, scheduler first (docs/architecture.md lists the same tree):

    pdmesh.generate                  root, at the scheduler: the whole request
      pdmesh.schedule                placement (plan, candidates) and the reservation of KV blocks
      Prefill/Prefill (rpc)          -> at the prefill worker:
        pdmesh.prefill.queue            waiting in the prefill engine
        pdmesh.prefill.compute          the prompt's forward passes up to the first token
        pdmesh.kv.transfer              the layer-wise push (bytes, GB/s, exposed vs hidden time)
      Decode/Generate (rpc)          -> at the decode worker:
        pdmesh.decode.wait_kv           until the ticket's last layer had landed
        pdmesh.decode.first_step        joining the batch until its first token
        pdmesh.decode.stream            every token after that (tokens, TPOT)
    (at the decode worker, under Decode/Reserve: pdmesh.kv.transfer, direction recv, its parent
     carried inside the ticket)

Phases are measured where they happen and recorded when they end, with their real start and end
times (`record`): the engine's clock is time.monotonic, spans want Unix nanoseconds.
Attribute keys follow OpenTelemetry's GenAI semantic conventions where one exists.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

Attributes = Mapping[str, AttributeValue]


class SpanName(enum.Enum):
    GENERATE = "pdmesh.generate"
    SCHEDULE = "pdmesh.schedule"
    PREFILL_QUEUE = "pdmesh.prefill.queue"
    PREFILL_COMPUTE = "pdmesh.prefill.compute"
    KV_TRANSFER = "pdmesh.kv.transfer"
    DECODE_WAIT_KV = "pdmesh.decode.wait_kv"
    DECODE_FIRST_STEP = "pdmesh.decode.first_step"
    DECODE_STREAM = "pdmesh.decode.stream"


class Attr:
    """Attribute keys. gen_ai.*: OpenTelemetry's GenAI conventions; pdmesh.*: ours."""

    OPERATION = "gen_ai.operation.name"
    PROVIDER = "gen_ai.provider.name"
    MODEL = "gen_ai.request.model"
    MAX_TOKENS = "gen_ai.request.max_tokens"
    TEMPERATURE = "gen_ai.request.temperature"
    TOP_P = "gen_ai.request.top_p"
    TOP_K = "gen_ai.request.top_k"
    SEED = "gen_ai.request.seed"
    RESPONSE_ID = "gen_ai.response.id"
    FINISH_REASONS = "gen_ai.response.finish_reasons"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    CACHED_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"

    REQUEST_ID = "pdmesh.request_id"
    WORKER_ID = "pdmesh.worker_id"
    PLAN = "pdmesh.plan"
    PREFILL_WORKER = "pdmesh.prefill_worker_id"
    DECODE_WORKER = "pdmesh.decode_worker_id"
    CANDIDATES = "pdmesh.schedule.candidates"
    TTFT_MS = "pdmesh.ttft_ms"
    TPOT_MS = "pdmesh.tpot_ms"
    SLO_TTFT_MS = "pdmesh.slo.ttft_ms"
    SLO_TPOT_MS = "pdmesh.slo.tpot_ms"
    FAILOVERS = "pdmesh.decode_failovers"
    COMPUTED_TOKENS = "pdmesh.prefill.computed_tokens"
    CACHED_TOKENS = "pdmesh.prefill.cached_tokens"
    DECODE_TOKENS = "pdmesh.decode.tokens"
    KV_DIRECTION = "pdmesh.kv.direction"
    KV_TICKET = "pdmesh.kv.ticket_id"
    KV_PEER = "pdmesh.kv.peer"
    KV_BYTES = "pdmesh.kv.bytes"
    KV_SECONDS = "pdmesh.kv.seconds"
    KV_GBPS = "pdmesh.kv.gbps"
    KV_TRANSPORT = "pdmesh.kv.transport"
    KV_LAYERS = "pdmesh.kv.layers"
    KV_EXPOSED_MS = "pdmesh.kv.exposed_ms"
    KV_HIDDEN_MS = "pdmesh.kv.hidden_ms"


def tracer() -> trace.Tracer:
    return trace.get_tracer("pdmesh")


def unix_ns(monotonic_s: float, offset_ns: int | None = None) -> int:
    """A time.monotonic() reading as Unix nanoseconds (what spans carry); offset_ns: a
    clock_offset_ns() reading, so that several conversions share one."""
    offset = clock_offset_ns() if offset_ns is None else offset_ns
    return offset + round(monotonic_s * 1e9)


def clock_offset_ns() -> int:
    """Unix time minus monotonic time, in nanoseconds."""
    return time.time_ns() - round(time.monotonic() * 1e9)


def record(
    name: SpanName, start: float, end: float, attributes: Attributes | None = None,
    parent: otel_context.Context | None = None,
) -> Span:  # fmt: skip
    """A finished span from start to end (time.monotonic() readings), under the current span or
    `parent`. Cheap when tracing is off: nothing is recorded."""
    offset = clock_offset_ns()
    span = tracer().start_span(name.value, context=parent, attributes=attributes, start_time=unix_ns(start, offset))
    span.end(end_time=unix_ns(max(start, end), offset))
    return span


def traceparent() -> str:
    """The current span's context as a W3C traceparent ("" when there is none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def context_of(parent: str) -> otel_context.Context | None:
    """The context a W3C traceparent describes; None when it is empty."""
    return propagate.extract({"traceparent": parent}) if parent else None


def ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span as hex, or None outside any span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
