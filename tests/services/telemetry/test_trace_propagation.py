"""Trace context crosses a real loopback gRPC hop through the interceptors every server
(services/bootstrap.py) and channel (pdmesh/channel.py) install; plumbing calls leave no spans."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pdmesh.channel import channel
from pdmesh.config import ServerConfig
from pdmesh.v1 import decode_pb2, decode_pb2_grpc
from services.bootstrap import Server
from services.telemetry.spans import SpanName, ids, record, tracer
from tests.services.fake_decode import binding


@contextlib.asynccontextmanager
async def decode_server() -> AsyncIterator[str]:
    server = Server([binding()], ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=2.0))
    port = await server.start()
    await server.set_serving()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop()


async def test_a_call_joins_the_callers_trace(spans: InMemorySpanExporter) -> None:
    async with decode_server() as target, channel(target) as ch:
        with tracer().start_as_current_span("caller") as caller:
            await decode_pb2_grpc.DecodeStub(ch).Reserve(decode_pb2.ReserveRequest(request_id="r1"), timeout=5)
            stream = decode_pb2_grpc.DecodeStub(ch).Generate(
                decode_pb2.DecodeGenerateRequest(request_id="slow-3"), timeout=5
            )
            assert [list(r.chunk.token_ids) async for r in stream] == [[0], [1], [2]]
    finished = {(s.name, s.kind): s for s in spans.get_finished_spans()}
    trace_id = caller.get_span_context().trace_id
    for method in ("Reserve", "Generate"):
        client = finished[(f"/pdmesh.v1.Decode/{method}", SpanKind.CLIENT)]
        server = finished[(f"/pdmesh.v1.Decode/{method}", SpanKind.SERVER)]
        assert client.context.trace_id == server.context.trace_id == trace_id
        assert client.parent.span_id == caller.get_span_context().span_id
        assert server.parent.span_id == client.context.span_id  # the hop: server under the client span


async def test_health_checks_leave_no_spans(spans: InMemorySpanExporter) -> None:
    async with decode_server() as target, channel(target) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert spans.get_finished_spans() == ()


def test_a_recorded_phase_keeps_its_times_and_parent(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("request") as parent:
        current = ids()
        record(SpanName.PREFILL_QUEUE, 100.0, 100.25, {"pdmesh.request_id": "r1"})
    context = parent.get_span_context()
    assert current == (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    (finished,) = [s for s in spans.get_finished_spans() if s.name == "pdmesh.prefill.queue"]
    assert finished.parent.span_id == parent.get_span_context().span_id
    assert finished.end_time - finished.start_time == 250_000_000
    assert finished.attributes["pdmesh.request_id"] == "r1"
    assert ids() is None  # outside any span
