"""An OTLP receiver inside the test: a real gRPC server implementing OpenTelemetry's TraceService
and MetricsService (opentelemetry-proto), which the mesh's processes export to like to any
collector. It keeps every span and metric it receives, with the exporting service's name."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attributes(kvs: Iterator[KeyValue] | Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    span: Span

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes(self.span.attributes)

    @property
    def duration_ms(self) -> float:
        return (self.span.end_time_unix_nano - self.span.start_time_unix_nano) / 1e6


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.metrics: list[tuple[str, Metric]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the OTLP method name)
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            with self._lock:
                for resource_spans in request.resource_spans:
                    service = attributes(resource_spans.resource.attributes).get("service.name", "")
                    for scope in resource_spans.scope_spans:
                        self.spans += [ReceivedSpan(service, s) for s in scope.spans]
            return trace_service_pb2.ExportTraceServiceResponse()
        with self._lock:
            for resource_metrics in request.resource_metrics:
                service = attributes(resource_metrics.resource.attributes).get("service.name", "")
                for scope in resource_metrics.scope_metrics:
                    self.metrics += [(service, m) for m in scope.metrics]
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def wait_for(self, what: str, found: Callable[[OtlpReceiver], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not found(self):
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in self.spans})
                raise AssertionError(f"no {what} within {timeout_s:.0f} s; spans so far: {names}")
            time.sleep(0.1)
