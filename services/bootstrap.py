"""Server plumbing, written once for every service.

A service builds its servicers, wraps each in a `ServicerBinding`, and calls `serve`. It gets:
- a grpc.aio server bound to ServerConfig.address, with TLS or mTLS when configured, raised
  message limits and keepalive that tolerates long silent calls;
- the standard health service (grpc.health.v1), honest: each service SERVING only while its
  binding's `ready` says it can do its job (the scheduler: a decode worker is live; a worker:
  registered), the server ("") only while every service is; NOT_SERVING before start-up is done
  and again from the moment it starts draining;
- server reflection listing every service (grpcurl, grpc_cli);
- OpenTelemetry's server interceptor (pdmesh/tracing.py): each call's span joins the caller's
  trace through the W3C traceparent in its metadata;
- one interceptor (services/interceptor.py) that maps typed errors to status codes
  (services/status.py) for unary and streaming calls alike, errors raised mid-stream included,
  and never sends a traceback; an error that knows when to retry (`retry_after_s`) also sends a
  google.rpc.RetryInfo in the status details (services/convert_status.py);
- graceful shutdown on SIGTERM/SIGINT: the service's on_drain first (a worker reports DRAINING),
  then health NOT_SERVING, new calls refused with UNAVAILABLE (except to services that stay open
  while draining: the scheduler's Registry, so workers keep reporting), calls in flight given
  ServerConfig.shutdown_grace_s to finish, then the server stops.

Servicers stay thin: they convert, call and convert back, and raise typed errors. A service that
calls another opens its channel with pdmesh.channel.channel, which shares these limits and
keepalive (it lives in pdmesh/ because the public client library needs it too).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdmesh.channel import transport_options
from pdmesh.config import ServerConfig
from pdmesh.tracing import server_interceptor
from services.interceptor import ErrorInterceptor, InFlight, StreamCloser

log = structlog.get_logger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Calls to these stay open while draining and are not counted as work in flight.
_PLUMBING = (f"/{_HEALTH_NAME}/", f"/{reflection.SERVICE_NAME}/")
_READINESS_POLL_S = 0.2  # how often the health of services with a `ready` check is re-evaluated


@dataclass(frozen=True)
class ServicerBinding:
    """One servicer and how to add it: ServicerBinding(servicer,
    decode_pb2_grpc.add_DecodeServicer_to_server, decode_pb2.DESCRIPTOR.services_by_name["Decode"])."""

    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    service: ServiceDescriptor
    # Whether the service can do its job now (health SERVING); None: whenever the server serves.
    ready: Callable[[], bool] | None = None
    # Calls keep being accepted while the server drains, and are not waited for (load reports).
    open_while_draining: bool = False

    @property
    def name(self) -> str:
        return self.service.full_name


def server_options(config: ServerConfig) -> list[tuple[str, int | str]]:
    return [
        *transport_options(config.max_message_bytes, config.keepalive_time_ms, config.keepalive_timeout_ms),
        # Clients ping through long silent calls (a long prefill); never count that as abuse.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", config.keepalive_min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 0),
        # A port in use must fail the bind, not be shared silently with another server.
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured; client certificates required with a CA."""
    if config.tls_cert_path is None or config.tls_key_path is None:
        return None
    ca = config.tls_ca_path.read_bytes() if config.tls_ca_path else None
    return grpc.ssl_server_credentials(
        [(config.tls_key_path.read_bytes(), config.tls_cert_path.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class Server:
    """A started gRPC server with health, reflection, the interceptor and graceful stop."""

    def __init__(
        self,
        bindings: Sequence[ServicerBinding],
        config: ServerConfig,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """`interceptors` run inside tracing, before the error interceptor (authentication)."""
        self.config = config
        self._interceptors = tuple(interceptors)
        self.service_names = tuple(b.name for b in bindings)
        self.port = 0
        self._bindings = tuple(bindings)
        self._in_flight = InFlight()
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._health_now: dict[str, int] = {}

    @property
    def draining(self) -> bool:
        return self._in_flight.draining

    async def start(self) -> int:
        """Bind and start, health NOT_SERVING; returns the bound port."""
        # The tracing interceptor outside the error interceptor: its span covers the call, and
        # sees the status the error interceptor aborts with (through the servicer context it hands
        # on); the stream closer outside both, so a stream's span ends in its own call's task.
        errors = ErrorInterceptor(self._in_flight, _PLUMBING, self._open_while_draining)
        server = grpc.aio.server(
            interceptors=[StreamCloser(), server_interceptor(), *self._interceptors, errors],
            options=server_options(self.config),
        )
        for binding in self._bindings:
            binding.add_to_server(binding.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [*self.service_names, _HEALTH_NAME, reflection.SERVICE_NAME], server
        )
        creds = server_credentials(self.config)
        address = self.config.address
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        await self._set_health(_NOT_SERVING)
        await server.start()
        self._server, self.port = server, port
        return port

    @property
    def _open_while_draining(self) -> tuple[str, ...]:
        return tuple(f"/{b.name}/" for b in self._bindings if b.open_while_draining)

    async def set_serving(self) -> None:
        """Start-up is done: from now each service's health follows its `ready` check (SERVING at
        once for those without one), and the server's ("") is SERVING while every service is."""
        await self._update_health()
        if any(b.ready is not None for b in self._bindings):
            self._watch = asyncio.create_task(self._watch_readiness(), name="health-readiness")

    async def _watch_readiness(self) -> None:
        while not self.draining:
            await asyncio.sleep(_READINESS_POLL_S)
            await self._update_health()

    async def _update_health(self) -> None:
        ready = {b.name: b.ready is None or b.ready() for b in self._bindings}
        ready[""] = all(ready.values())
        for name, ok in ready.items():
            status = _SERVING if ok else _NOT_SERVING
            if self._health_now.get(name) != status and not self.draining:
                self._health_now[name] = status
                await self._health.set(name, status)

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, refuse new calls, wait for those in flight, then stop.
        Calling it again while it runs waits for the same stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._drain_and_stop())
        await asyncio.shield(self._stopping)

    async def _drain_and_stop(self) -> None:
        assert self._server is not None, "stop() before start()"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_s
        await self._health.enter_graceful_shutdown()
        self._in_flight.draining = True
        if self._watch is not None:
            self._watch.cancel()
        if not await self._in_flight.wait_idle(self.config.shutdown_grace_s):
            log.warning("grace period over; cancelling calls in flight", calls=self._in_flight.count)
        await self._server.stop(max(0.0, deadline - loop.time()))

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *self.service_names):
            await self._health.set(name, status)


async def serve(
    bindings: Sequence[ServicerBinding],
    config: ServerConfig,
    *,
    on_ready: Callable[[Server], Awaitable[None]] | None = None,
    on_drain: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Run a server until SIGTERM or SIGINT (or until `stop` is set), then drain and return.

    on_ready runs once the server is SERVING (register with the scheduler, report the port);
    on_drain runs when the stop begins, before the drain (tell the scheduler: DRAINING);
    on_shutdown runs after the server stopped (stop the engine, close channels). `stop` lets the
    service end itself as a signal would: a worker whose device is lost.
    """
    server = Server(bindings, config, interceptors)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.set_serving()
        log.info("serving", port=server.port, services=list(server.service_names), tls=config.tls)
        if on_ready is not None:
            await on_ready(server)
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        log.info("draining", grace_s=config.shutdown_grace_s)
        if on_drain is not None:
            try:
                await on_drain()
            except Exception:  # the drain must go on: calls in flight still get their grace
                log.exception("on_drain failed")
        await server.stop()
        log.info("stopped")
        if on_shutdown is not None:
            await on_shutdown()
