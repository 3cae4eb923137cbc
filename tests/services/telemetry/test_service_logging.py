"""What a service's log lines look like: JSON with the trace, span and request ids inside a
request; readable on a terminal; an exception's traceback without its frames' locals.

Each scenario runs in a fresh interpreter: logging configuration is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, structlog
from pdmesh.config import LogFormat
from services.logging import configure_logging, request_context
from services.telemetry.otel import ServiceName, start_otel
from pdmesh.config import OtelExport

start_otel(ServiceName.DECODE, "decode-0", OtelExport())
configure_logging("decode", "info", LogFormat.{fmt})
log = structlog.get_logger("test")
log.info("outside")
log.debug("hidden below the level")
from services.telemetry.spans import tracer
with tracer().start_as_current_span("request") as span, request_context("r-42"):
    c = span.get_span_context()
    print(format(c.trace_id, "032x"), format(c.span_id, "016x"), flush=True)
    log.info("inside", tokens=3)
    logging.getLogger("grpc").warning("from the standard library")
    secret_tensor = "SECRET" * 1000
    try:
        raise RuntimeError("step failed")
    except RuntimeError:
        log.exception("engine step failed")
"""


def run(fmt: str) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(fmt=fmt)], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout, done.stderr


def test_json_lines_carry_the_request_and_its_trace() -> None:
    out, err = run("JSON")
    trace_id, span_id = out.split()
    lines = [json.loads(line) for line in err.splitlines()]
    assert [line["event"] for line in lines] == [
        "outside", "inside", "from the standard library", "engine step failed",
    ]  # fmt: skip
    outside, inside, foreign, failed = lines
    assert "trace_id" not in outside and "request_id" not in outside
    for line in (inside, foreign, failed):
        assert (line["trace_id"], line["span_id"], line["request_id"]) == (trace_id, span_id, "r-42")
        assert line["service"] == "decode"
    assert inside["tokens"] == 3
    (frame,) = failed["exception"][0]["frames"]
    assert "locals" not in frame and "SECRET" not in err  # the traceback, never the locals
    assert failed["exception"][0]["exc_value"] == "step failed"


def test_a_terminal_gets_readable_key_value_lines() -> None:
    out, err = run("CONSOLE")
    trace_id, _ = out.split()
    inside = next(line for line in err.splitlines() if "inside" in line)
    assert "request_id=r-42" in inside and f"trace_id={trace_id}" in inside and "tokens=3" in inside
    assert "Traceback" in err and "RuntimeError: step failed" in err and "SECRET" not in err
