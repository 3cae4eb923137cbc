"""The OpenTelemetry SDK in one service process: a tracer provider always, exporters when the
standard OTEL_* variables configure them.

`start_otel(ServiceName.DECODE, "decode-0")` once at process start, `shutdown()` of what it returns
at the end (it flushes the spans still batched). With no OTLP endpoint set the tracer provider
samples nothing: spans are not recorded and nothing is exported, but every request still gets a
trace id that travels with its calls, so the log lines of one request carry one trace id in
every process. With an endpoint, the SDK's own sampler setting (OTEL_TRACES_SAMPLER, parent-based
always-on by default) applies and a batch processor exports over OTLP/gRPC or OTLP/HTTP; the
exporters read endpoint, headers and timeouts from OTEL_* themselves. The GenAI server metrics
(services/telemetry/genai.py) are exported the same way when a metrics endpoint is configured.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from pdmesh.config import OtelExport, OtlpProtocol

log = structlog.get_logger(__name__)


class ServiceName(enum.Enum):
    """OpenTelemetry's service.name of each pdmesh service."""

    SCHEDULER = "pdmesh-scheduler"
    PREFILL = "pdmesh-prefill"
    DECODE = "pdmesh-decode"
    KVSTORE = "pdmesh-kvstore"


@dataclass
class Otel:
    """What start_otel installed; shutdown() flushes and stops it."""

    export: OtelExport
    _stops: list[Callable[[], object]] = field(default_factory=list)

    def shutdown(self) -> None:
        for stop in self._stops:
            try:
                stop()
            except Exception:  # an unreachable collector must not turn a clean stop into a crash
                log.warning("telemetry shutdown failed", exc_info=True)
        self._stops.clear()


def start_otel(
    service: ServiceName, instance_id: str, export: OtelExport, span_processor: SpanProcessor | None = None
) -> Otel:
    """Install the process's tracer (and, when exported, meter) provider.

    span_processor: an extra processor (tests collect finished spans in memory with it)."""
    resource = Resource.create({"service.name": service.value, "service.instance.id": instance_id})
    recording = export.traces is not None or span_processor is not None
    # sampler None: the SDK's own (OTEL_TRACES_SAMPLER); off when nothing would see the spans.
    tracer_provider = TracerProvider(resource=resource, sampler=None if recording else ALWAYS_OFF)
    if export.traces is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(export.traces)))
    if span_processor is not None:
        tracer_provider.add_span_processor(span_processor)
    trace.set_tracer_provider(tracer_provider)
    otel = Otel(export, [tracer_provider.shutdown])
    if export.metrics is not None:
        reader = PeriodicExportingMetricReader(_metric_exporter(export.metrics))
        meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
        metrics.set_meter_provider(meter_provider)
        otel._stops.append(meter_provider.shutdown)
    if export.any:
        log.info("exporting telemetry over OTLP", traces=_name(export.traces), metrics=_name(export.metrics))
    return otel


def _name(protocol: OtlpProtocol | None) -> str:
    return protocol.value if protocol is not None else "off"


def _span_exporter(protocol: OtlpProtocol) -> SpanExporter:
    if protocol is OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpans

        return GrpcSpans()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpans

    return HttpSpans()


def _metric_exporter(protocol: OtlpProtocol) -> MetricExporter:
    if protocol is OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetrics

        return GrpcMetrics()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetrics

    return HttpMetrics()
