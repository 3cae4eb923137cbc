"""Structured logging for every service, configured in one place.

`configure_logging("decode", "info")` once at process start; after it, both structlog loggers
and the standard library's (grpc, asyncio, ...) write one JSON object per line to stderr with
the service name, level, timestamp, logger name and any context bound with
structlog.contextvars (request_id, trace_id, span_id). Modules get their logger with
`structlog.get_logger(__name__)` and never configure anything.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import Processor


def configure_logging(service_name: str, level: str | int = "info", extra: Sequence[Processor] = ()) -> None:
    """Route structlog and stdlib logging to JSON lines on stderr at `level`.

    `extra` processors run before rendering (telemetry adds the current trace and span ids).
    """

    def add_service(
        _logger: object, _method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event.setdefault("service", service_name)
        return event

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
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
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # The traceback, never the frames' locals (structlog's default): a failed step's
                # locals hold whole tensors, megabytes of log per error, and request contents.
                structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
