"""What the scheduler tells about the requests it serves: the root span of each request's trace
(`pdmesh.generate`), Prometheus metrics (vLLM's names, `pdmesh:` prefix) and the OpenTelemetry
GenAI server metrics.

`RequestWatch` follows one request from the moment its call arrives: it opens the root span
(as a child of the caller's span when the call carried a traceparent), binds the request id to
every log line, times the chunks as they go to the client, and records the request's figures
when it ends, however it ends. The servicer only reports what happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType

import grpc
import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry

from pdmesh.tracing import remote_context
from services.scheduler.request import PlacementReport, Response, SchedulerRequest, Usage
from services.status import typed_code
from services.telemetry.genai import GenAiServerMetrics
from services.telemetry.metrics import ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS, counter, gauge, histogram
from services.telemetry.spans import Attr, Attributes, SpanName, tracer

log = structlog.get_logger(__name__)


class SchedulerMetrics:
    def __init__(self, model: str, running: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.model = model
        self.registry = r = CollectorRegistry()
        m = "model_name"
        self.ttft = histogram(r, "time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS, m).labels(model)
        self.itl = histogram(r, "inter_token_latency_seconds", "Time between tokens", ITL_BUCKETS, m).labels(model)
        self.e2e = histogram(r, "e2e_request_latency_seconds", "Request latency", REQUEST_BUCKETS, m).labels(model)
        self.queue = histogram(
            r, "request_queue_time_seconds", "Placement, reservation and waits for KV blocks", REQUEST_BUCKETS, m
        ).labels(model)
        gauge(r, "num_requests_running", "Requests being served").set_function(running)
        gauge(r, "num_requests_waiting", "Requests waiting for KV blocks").set_function(waiting)
        self.success = counter(r, "request_success", "Requests finished, by finish reason", m, "finished_reason")
        self.prompt_tokens = counter(r, "prompt_tokens", "Prompt tokens of finished requests", m).labels(model)
        self.generation_tokens = counter(r, "generation_tokens", "Tokens generated", m).labels(model)
        self.cached_tokens = counter(r, "prompt_cached_tokens", "Prompt tokens served from a cache", m).labels(model)
        self.placements = counter(r, "placements", "Requests placed, by plan", "plan")
        self.rejections = counter(r, "rejections", "Requests that ended with an error, by status", "reason")
        self.slo = counter(
            r, "slo_requests", "Finished requests with an SLO target, by target and outcome", "slo", "attained"
        )
        self.failovers = counter(r, "decode_failovers", "Streams moved to another decode worker")
        self.genai = GenAiServerMetrics(model)


class RequestWatch:
    """`with RequestWatch(metrics, metadata) as watch:` around one request, whichever door it came
    through (Door.watch opens it; the Door reports to it)."""

    def __init__(self, metrics: SchedulerMetrics, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.request: SchedulerRequest | None = None
        self._last_sent: float | None = None
        self._ended = False
        self.span = tracer().start_span(
            SpanName.GENERATE.value, context=remote_context(metadata), kind=SpanKind.SERVER,
            attributes={Attr.MODEL: metrics.model, Attr.OPERATION: "text_completion"},
        )  # fmt: skip
        self._current = trace.use_span(self.span, end_on_exit=True)

    def __enter__(self) -> RequestWatch:
        self._current.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is not None and not self._ended:
            self._failed(error)
        structlog.contextvars.unbind_contextvars("request_id")
        self._current.__exit__(None, None, None)  # the status is set; no second record of the error

    def accepted(self, request: SchedulerRequest, chat: bool = False) -> None:
        """The request passed its checks; `chat`: its prompt was a conversation."""
        self.request = request
        if chat:
            self.span.set_attribute(Attr.OPERATION, "chat")
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        s = request.sampling
        log.debug("request accepted", prompt_tokens=request.num_prompt_tokens, max_tokens=s.max_tokens)
        self.span.set_attributes({
            Attr.REQUEST_ID: request.request_id, Attr.MAX_TOKENS: s.max_tokens, Attr.TEMPERATURE: s.temperature,
            Attr.INPUT_TOKENS: request.num_prompt_tokens, Attr.SEED: s.seed or 0,
            Attr.SLO_TTFT_MS: request.slo.ttft_ms, Attr.SLO_TPOT_MS: request.slo.tpot_ms,
        })  # fmt: skip

    def sent(self, response: Response) -> None:
        """A response went to the client."""
        now = time.monotonic()
        tokens = len(response.chunk.token_ids)
        if tokens and self._last_sent is not None:
            for _ in range(tokens):  # a chunk of several tokens: its wait shared among them
                self.metrics.itl.observe((now - self._last_sent) / tokens)
        if tokens:
            self._last_sent = now
        if response.usage is not None:
            self._finished(response)

    def _finished(self, response: Response) -> None:
        self._ended = True
        usage, placement, m = response.usage, response.placement, self.metrics
        assert usage is not None and placement is not None
        reason = response.chunk.finish.reason.value if response.chunk.finish else "unknown"
        m.success.labels(m.model, reason).inc()
        m.ttft.observe(usage.ttft_ms / 1000)
        m.e2e.observe(usage.e2e_ms / 1000)
        m.queue.observe(usage.schedule_ms / 1000)
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.generation_tokens.inc(usage.completion_tokens)
        m.cached_tokens.inc(usage.cached_prompt_tokens)
        if placement.plan is not None:
            m.placements.labels(placement.plan.value).inc()
        m.failovers.inc(placement.num_decode_failovers)
        tpot_ms = _tpot_ms(usage)
        self._slo(usage.ttft_ms, tpot_ms)
        m.genai.finished(usage.ttft_ms / 1000, tpot_ms / 1000 if tpot_ms is not None else None, usage.e2e_ms / 1000)
        self.span.set_attributes(_usage_attributes(usage, placement, reason, tpot_ms))
        log.debug("request finished", reason=reason, tokens=usage.completion_tokens, ttft_ms=round(usage.ttft_ms, 2))

    def _slo(self, ttft_ms: float, tpot_ms: float | None) -> None:
        if self.request is None:
            return
        slo = self.request.slo
        if slo.ttft_ms > 0:
            self.metrics.slo.labels("ttft", str(ttft_ms <= slo.ttft_ms).lower()).inc()
        if slo.tpot_ms > 0 and tpot_ms is not None:
            self.metrics.slo.labels("tpot", str(tpot_ms <= slo.tpot_ms).lower()).inc()

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, Exception):
            reason = (typed_code(error) or grpc.StatusCode.INTERNAL).name.lower()
        else:  # CancelledError, GeneratorExit: the client went away
            reason = "cancelled"
        self.metrics.rejections.labels(reason).inc()
        self.metrics.genai.finished(None, None, time.monotonic() - self.start, error=reason)
        self.span.set_status(Status(StatusCode.ERROR, f"{reason}: {error}"))
        if reason != "cancelled":
            self.span.record_exception(error)


def _tpot_ms(usage: Usage) -> float | None:
    if usage.completion_tokens < 2:
        return None
    return (usage.e2e_ms - usage.ttft_ms) / (usage.completion_tokens - 1)


def _usage_attributes(usage: Usage, placement: PlacementReport, reason: str, tpot_ms: float | None) -> Attributes:
    return {
        Attr.OUTPUT_TOKENS: usage.completion_tokens, Attr.CACHED_INPUT_TOKENS: usage.cached_prompt_tokens,
        Attr.FINISH_REASONS: [reason], Attr.TTFT_MS: usage.ttft_ms, Attr.TPOT_MS: tpot_ms or 0.0,
        Attr.PLAN: placement.plan.value if placement.plan else "", Attr.FAILOVERS: placement.num_decode_failovers,
        Attr.PREFILL_WORKER: placement.prefill_worker_id, Attr.DECODE_WORKER: placement.decode_worker_id,
    }  # fmt: skip
