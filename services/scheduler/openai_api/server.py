"""uvicorn serving the HTTP door inside the scheduler's process and event loop.

Same loop as the gRPC server, so a route calls the core (Door) directly: no hop, no second copy
of the registry. The socket is bound here, before uvicorn starts, so a port in use fails the
scheduler's start with the port named (uvicorn would log and exit the process) and port 0 tells
its number. Signals stay with services/bootstrap.serve: uvicorn's own handlers are not installed,
and the scheduler stops this server when it drains (drain: no new connections, requests in
flight get the gRPC server's grace to finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from engine.tokenizer import Tokenizer
from pdmesh.config import SchedulerConfig
from services.auth import ApiKeys
from services.scheduler.door import Door
from services.scheduler.openai_api.app import HttpDoor, build_app

log = structlog.get_logger(__name__)


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the scheduler's serve() owns SIGTERM/SIGINT and calls drain()


class HttpServer:
    def __init__(self, http: HttpDoor, host: str, port: int, grace_s: float) -> None:
        self.http = http
        self.host = host
        self.port = port
        self._config = uvicorn.Config(
            build_app(http), lifespan="off", access_log=False, log_config=None,
            timeout_graceful_shutdown=max(1, round(grace_s)),
        )  # fmt: skip
        self._server = _InLoopServer(self._config)
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_scheduler(cls, config: SchedulerConfig, door: Door, tokenizer: Tokenizer) -> HttpServer | None:
        """The scheduler's HTTP door as configured; None when PDMESH_HTTP_PORT is empty."""
        http, server = config.http, config.server
        if http.port is None:
            return None
        keys = ApiKeys(config.door_keys.http)
        state = HttpDoor(door, tokenizer, keys, http.request_timeout_s, server.max_message_bytes)
        host = http.host if http.host is not None else server.host
        if not state.keys.required and not _loopback(host):
            log.warning("the HTTP door takes requests without a key on a non-loopback address; "
                        "set PDMESH_API_KEYS to require one", host=host)  # fmt: skip
        return cls(state, host, http.port, server.shutdown_grace_s)

    def bind(self) -> int:
        """Take the port (OSError naming it when it is in use); returns it. Connections wait in
        the backlog until start()."""
        self._socket = _bind(self.host, self.port)
        self.port = int(self._socket.getsockname()[1])
        return self.port

    async def start(self) -> int:
        """Serve (binding first if bind() was not called); returns the port."""
        sock = self._socket or _bind(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-door")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("HTTP door serving", host=self.host, port=self.port)
        return self.port

    def drain(self) -> None:
        """Stop accepting connections and requests; those in flight go on for the grace period."""
        self.http.draining = True
        self._server.should_exit = True

    async def stop(self) -> None:
        """Drain and wait until the last request finished or the grace ran out. Again: no-op."""
        self.drain()
        if self._task is not None:
            await self._task
        elif self._socket is not None:  # bound, never started
            self._socket.close()


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"the HTTP door cannot listen on {host}:{port} ({e.strerror}); "
                               "free the port or choose another with --http-port") from None  # fmt: skip
    sock.listen(2048)
    sock.setblocking(False)
    return sock
