"""The server plumbing every service shares, on real loopback servers.

Scenarios: health follows readiness and draining; reflection lists the services; every typed
error reaches the client as the right status with a message naming the field, for unary calls
and in the middle of a stream, and nothing else leaks; SIGTERM drains a real process, which
exits 0; mTLS refuses a client without a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from fake_decode import binding
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from structlog.testing import capture_logs

from pdmesh.channel import channel, sync_channel
from pdmesh.config import ChannelConfig, ServerConfig
from pdmesh.v1 import decode_pb2, decode_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.bootstrap import Server, ServicerBinding
from tests.certs import make_certs

HERE = Path(__file__).parent
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LOOPBACK = ServerConfig(host="127.0.0.1", port=0, shutdown_grace_s=5.0)


@contextlib.asynccontextmanager
async def running(config: ServerConfig = LOOPBACK) -> AsyncIterator[Server]:
    server = Server([binding()], config)
    await server.start()
    await server.set_serving()
    try:
        yield server
    finally:
        await server.stop()


async def read_rest(stream: grpc.aio.UnaryStreamCall) -> list[list[int]]:
    """The token ids of every remaining response (read() and iteration cannot be mixed)."""
    rest = []
    while (response := await stream.read()) is not grpc.aio.EOF:
        rest.append(list(response.chunk.token_ids))
    return rest


async def health_of(ch: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return response.status


async def test_health_is_serving_when_ready_and_not_serving_while_draining() -> None:
    server = Server([binding()], LOOPBACK)
    port = await server.start()
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(server.stop)
        ch = await cleanup.enter_async_context(channel(f"127.0.0.1:{port}"))
        assert await health_of(ch) == NOT_SERVING  # started, not ready yet
        await server.set_serving()
        assert await health_of(ch) == SERVING
        assert await health_of(ch, "pdmesh.v1.Decode") == SERVING

        stub = decode_pb2_grpc.DecodeStub(ch)
        stream = stub.Generate(decode_pb2.DecodeGenerateRequest(request_id="slow-6"), timeout=10)
        first = await stream.read()
        assert list(first.chunk.token_ids) == [0]
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.02)

        # Draining: health says NOT_SERVING, new work is refused, the call in flight finishes.
        assert await health_of(ch) == NOT_SERVING
        assert await health_of(ch, "pdmesh.v1.Decode") == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Reserve(decode_pb2.ReserveRequest(request_id="late"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (refused.value.details() or "")
        assert await read_rest(stream) == [[1], [2], [3], [4], [5]]
        assert await stream.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 5)


async def test_a_service_is_serving_only_while_its_readiness_check_says_so() -> None:
    able = False
    server = Server([dataclasses.replace(binding(), ready=lambda: able)], LOOPBACK)
    port = await server.start()
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(server.stop)
        ch = await cleanup.enter_async_context(channel(f"127.0.0.1:{port}"))
        await server.set_serving()
        assert (await health_of(ch), await health_of(ch, "pdmesh.v1.Decode")) == (NOT_SERVING, NOT_SERVING)

        able = True
        await eventually_health(ch, SERVING)
        assert await health_of(ch, "pdmesh.v1.Decode") == SERVING
        able = False
        await eventually_health(ch, NOT_SERVING)


class CountingRegistry(worker_pb2_grpc.RegistryServicer):
    def __init__(self) -> None:
        self.reports = 0

    async def ReportLoad(  # noqa: N802
        self, request: worker_pb2.ReportLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReportLoadResponse:
        self.reports += 1
        return worker_pb2.ReportLoadResponse()


async def test_a_service_open_while_draining_takes_calls_while_the_rest_drain() -> None:
    registry = CountingRegistry()
    reports = ServicerBinding(
        registry, worker_pb2_grpc.add_RegistryServicer_to_server, worker_pb2.DESCRIPTOR.services_by_name["Registry"],
        open_while_draining=True,
    )  # fmt: skip
    server = Server([binding(), reports], LOOPBACK)
    port = await server.start()
    await server.set_serving()
    async with channel(f"127.0.0.1:{port}") as ch:
        stream = decode_pb2_grpc.DecodeStub(ch).Generate(decode_pb2.DecodeGenerateRequest(request_id="slow-6"))
        await stream.read()
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0.02)
        assert await health_of(ch) == NOT_SERVING
        # While the stream drains, load reports are still taken (the scheduler's Registry).
        await worker_pb2_grpc.RegistryStub(ch).ReportLoad(worker_pb2.ReportLoadRequest(worker_id="w"), timeout=5)
        assert registry.reports == 1
        assert await read_rest(stream) == [[1], [2], [3], [4], [5]]
        await asyncio.wait_for(stopping, 5)


async def eventually_health(ch: grpc.aio.Channel, status: int, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await health_of(ch) != status:
        assert asyncio.get_running_loop().time() < deadline, f"health never became {status}"
        await asyncio.sleep(0.02)


async def test_reflection_lists_every_service_and_serves_their_descriptors() -> None:
    async with running() as server:

        def ask() -> tuple[set[str], str]:
            with sync_channel(f"127.0.0.1:{server.port}") as ch:
                db = ProtoReflectionDescriptorDatabase(ch)
                return set(db.get_services()), db.FindFileContainingSymbol("pdmesh.v1.Decode").name

        services, decode_file = await asyncio.to_thread(ask)
    assert services == {
        "pdmesh.v1.Decode",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert decode_file == "pdmesh/v1/decode.proto"


TYPED_ERRORS = [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "num_tokens: is 0; reserve at least 1 token"),
    ("out-of-blocks", grpc.StatusCode.RESOURCE_EXHAUSTED, "num_blocks: needs 9 blocks"),
    ("request-not-found", grpc.StatusCode.NOT_FOUND, "request_id: r1 is not running"),
    ("model-load", grpc.StatusCode.FAILED_PRECONDITION, "/models/x: has no config.json"),
    ("ticket-not-found", grpc.StatusCode.NOT_FOUND, "ticket_id: t1 is not held here"),
    ("lease-expired", grpc.StatusCode.FAILED_PRECONDITION, "ticket_id: t1's lease ran out"),
    ("no-capacity", grpc.StatusCode.RESOURCE_EXHAUSTED, "slo.ttft_ms: no plan meets 5 ms"),
    ("no-live-worker", grpc.StatusCode.UNAVAILABLE, "model: no decode worker serves m"),
    ("transfer-failed", grpc.StatusCode.UNAVAILABLE, "kv_transfer_address: peer 10.0.0.1:1 hung up"),
]


async def test_typed_errors_reach_the_client_as_status_codes_in_unary_calls_and_mid_stream() -> None:
    async with running() as server, channel(f"127.0.0.1:{server.port}") as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        for case, code, message in TYPED_ERRORS:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.Reserve(decode_pb2.ReserveRequest(request_id=case), timeout=5)
            assert (unary.value.code(), case) == (code, case)
            assert message in (unary.value.details() or "")

            stream = stub.Generate(decode_pb2.DecodeGenerateRequest(request_id=case), timeout=5)
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as mid_stream:
                async for response in stream:
                    received.append(response.chunk.text)
            assert received == ["t0 "], case  # the chunk before the error arrived
            assert (mid_stream.value.code(), case) == (code, case)
            assert message in (mid_stream.value.details() or "")
            assert "Traceback" not in (mid_stream.value.details() or "")


async def test_an_unexpected_error_is_internal_with_an_error_id_and_no_detail() -> None:
    async with running() as server, channel(f"127.0.0.1:{server.port}") as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Reserve(decode_pb2.ReserveRequest(request_id="bug"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as mid_stream:
            async for _ in stub.Generate(decode_pb2.DecodeGenerateRequest(request_id="bug"), timeout=5):
                pass
    for error in (unary.value, mid_stream.value):
        details = error.details() or ""
        assert error.code() == grpc.StatusCode.INTERNAL
        assert details.startswith("internal error ") and details.endswith("; the server log has the details")
        assert "secret" not in details and "Traceback" not in details and "RuntimeError" not in details
    # The server log keeps what the client was not told, under the same error id.
    failed = [e for e in logs if e["event"] == "call failed"]
    assert len(failed) == 1 and failed[0]["method"] == "/pdmesh.v1.Decode/Reserve"
    assert failed[0]["error_id"] in (unary.value.details() or "")
    assert "secret internal detail" in str(failed[0]["exc_info"])


async def test_messages_past_grpc_default_4_mib_limit_pass_and_the_configured_limit_holds() -> None:
    big = "x" * (5 << 20)
    async with running() as server, channel(f"127.0.0.1:{server.port}") as ch:
        response = await decode_pb2_grpc.DecodeStub(ch).Reserve(
            decode_pb2.ReserveRequest(request_id=big), timeout=10
        )
        assert response.ticket.ticket_id == "t-xxxxxxxx"
    small = ServerConfig(host="127.0.0.1", port=0, max_message_bytes=1 << 20)
    async with running(small) as server, channel(f"127.0.0.1:{server.port}") as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await stub.Reserve(decode_pb2.ReserveRequest(request_id=big), timeout=10)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_sigterm_drains_a_real_server_process_which_exits_zero() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "drain_server.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20))
        async with channel(f"127.0.0.1:{port}") as ch:
            assert await health_of(ch) == SERVING
            stream = decode_pb2_grpc.DecodeStub(ch).Generate(
                decode_pb2.DecodeGenerateRequest(request_id="slow-8")
            )
            assert list((await stream.read()).chunk.token_ids) == [0]
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            assert await health_of(ch) == NOT_SERVING
            assert await read_rest(stream) == [[1], [2], [3], [4], [5], [6], [7]]  # in flight: finished
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read() if proc.stderr else ""
    assert '"event": "draining"' in stderr and '"event": "stopped"' in stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates")
async def test_mtls_serves_clients_with_a_certificate_and_refuses_those_without(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        tls_cert_path=certs["server.pem"],
        tls_key_path=certs["server.key"],
        tls_ca_path=certs["ca.pem"],
    )
    with_cert = ChannelConfig(
        tls_ca_path=certs["ca.pem"], tls_cert_path=certs["client.pem"], tls_key_path=certs["client.key"]
    )
    async with running(config) as server:
        async with channel(f"127.0.0.1:{server.port}", with_cert) as ch:
            assert await health_of(ch) == SERVING
        async with channel(f"127.0.0.1:{server.port}", ChannelConfig(tls_ca_path=certs["ca.pem"])) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_of(ch)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
