"""Structured logging for every service, configured in one place.

`configure_logging("decode", "info")` once at process start; after it, both structlog loggers
and the standard library's (grpc, asyncio, ...) write to stderr one line per event with the
service name, level, timestamp, logger name, the current trace and span ids (OpenTelemetry's, so
a request's lines in every process share its trace id) and any context bound with
structlog.contextvars (request_id: see `request_context`). JSON objects for collectors;
readable key=value lines on a terminal (LogFormat). Modules get their logger with
`structlog.get_logger(__name__)` and never configure anything.

An exception is logged with its traceback and never with its frames' local variables: a failed
engine step's locals hold whole tensors (megabytes of log per error) and request contents.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor

from pdmesh.config import LogFormat
from services.telemetry.spans import ids


def configure_logging(
    service_name: str, level: str | int = "info", fmt: LogFormat = LogFormat.AUTO, extra: Sequence[Processor] = ()
) -> None:
    """Route structlog and stdlib logging to stderr at `level`, as JSON lines or for a terminal.

    `extra` processors run before rendering.
    """

    def add_service(_logger: object, _method: str, event: EventDict) -> EventDict:
        event.setdefault("service", service_name)
        return event

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
        *extra,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(fmt)],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)


def _renderer(fmt: LogFormat) -> list[Processor]:
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if sys.stderr.isatty() else LogFormat.JSON
    if fmt is LogFormat.CONSOLE:
        # plain_traceback: rich's formatter (the default when rich is installed) prints locals.
        plain = structlog.dev.plain_traceback
        return [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), exception_formatter=plain)]
    return [
        structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
        structlog.processors.JSONRenderer(),
    ]


def add_trace_ids(_logger: object, _method: str, event: EventDict) -> EventDict:
    """The current OpenTelemetry trace and span ids, when the line is written inside a span."""
    current = ids()
    if current is not None:
        event.setdefault("trace_id", current[0])
        event.setdefault("span_id", current[1])
    return event


@contextlib.contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Every line logged inside carries request_id (a servicer wraps one call's work in it)."""
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        yield


class Outage:
    """One line when a peer stops answering, one warning if it is still unreachable `grace_s` later,
    and one line when it answers again — not a warning per retry (a worker retries its scheduler
    every half second). The grace keeps a moment's absence off the terminal: while `pdmesh up`
    stops the mesh the scheduler goes first (its streams finish on the workers), and a worker
    whose report lands before its own stop found nobody there; a restarted scheduler is back
    within seconds too. Only an outage that lasts is a warning, and not while `stopping()` says
    the service that owns it is draining itself (a worker's drain can outlast the grace on a
    loaded machine): the service's own state, never the process's, since one process may run
    several services (the tests do)."""

    def __init__(
        self,
        peer: str,
        grace_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.peer = peer
        self.grace_s = grace_s
        self._clock = clock
        self._stopping = stopping
        self._down_since: float | None = None
        self._warned = False
        self._log = structlog.get_logger("services.outage")

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, **fields: object) -> None:
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
            self._log.info(f"{self.peer} unreachable; retrying", **fields)
        elif not self._warned and now - self._down_since >= self.grace_s:
            self._warned = True
            say = self._log.info if self._stopping() else self._log.warning
            say(f"{self.peer} still unreachable after {now - self._down_since:.0f} s; retrying", **fields)

    def answered(self) -> None:
        if self._down_since is not None:
            self._down_since, self._warned = None, False
            self._log.info(f"{self.peer} reachable again")
