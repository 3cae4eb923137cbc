"""One recording tracer provider for the test process (OpenTelemetry allows one per process):
finished spans are kept in memory, cleared before each test that asks for them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pdmesh.config import OtelExport
from services.telemetry.otel import ServiceName, start_otel


@pytest.fixture(scope="session")
def _span_exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    start_otel(ServiceName.SCHEDULER, "tests", OtelExport(), span_processor=SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(_span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    _span_exporter.clear()
    yield _span_exporter
    _span_exporter.clear()
