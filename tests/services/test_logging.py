"""Service logs: one JSON object per line, exceptions with their traceback and never frame locals."""

from __future__ import annotations

import json
import logging

import pytest
import structlog
import structlog.testing

from services.logging import Outage, configure_logging


def test_an_exception_is_logged_with_its_traceback_and_without_the_frames_locals(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("decode", "info")

    def failing_step() -> None:
        secret_prompt = "the user's private prompt"  # noqa: F841 (a local the log must not show)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    try:
        failing_step()
    except RuntimeError:
        structlog.get_logger("engine").exception("engine step failed")
        logging.getLogger("engine.async_engine").error("stdlib too", exc_info=True)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["engine step failed", "stdlib too"]
    for line in lines:
        text = json.dumps(line)
        assert "illegal memory access" in text and "failing_step" in text
        assert "private prompt" not in text and "secret_prompt" not in text


def test_an_outage_warns_once_it_lasts_and_a_moments_absence_stays_off_the_terminal() -> None:
    now = [0.0]
    # Not stopping, whatever an earlier test's in-process server did (services.logging.process_stopping).
    outage = Outage("scheduler", grace_s=5.0, clock=lambda: now[0], stopping=lambda: False)
    with structlog.testing.capture_logs() as logs:
        for t in (0.0, 0.5, 1.0):  # the scheduler stopped first; the worker stops a second later
            now[0] = t
            outage.failed(code="UNAVAILABLE")
        outage.answered()
        for t in (10.0, 10.5, 15.0, 15.5, 20.0):  # an outage that lasts
            now[0] = t
            outage.failed(code="UNAVAILABLE")
        outage.answered()
    assert [(entry["log_level"], entry["event"]) for entry in logs] == [
        ("info", "scheduler unreachable; retrying"),
        ("info", "scheduler reachable again"),
        ("info", "scheduler unreachable; retrying"),
        ("warning", "scheduler still unreachable after 5 s; retrying"),
        ("info", "scheduler reachable again"),
    ]


def test_an_outage_that_lasts_while_this_process_stops_is_no_warning() -> None:
    now, stopping = [0.0], [False]
    outage = Outage("scheduler", grace_s=5.0, clock=lambda: now[0], stopping=lambda: stopping[0])
    with structlog.testing.capture_logs() as logs:
        stopping[0] = True  # this worker drains its streams for 8 s after the scheduler went
        for t in (0.0, 6.0, 8.0):
            now[0] = t
            outage.failed(code="UNAVAILABLE")
    assert [(entry["log_level"], entry["event"]) for entry in logs] == [
        ("info", "scheduler unreachable; retrying"),
        ("info", "scheduler still unreachable after 6 s; retrying"),
    ]
