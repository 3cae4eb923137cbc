"""Service logs: one JSON object per line, exceptions with their traceback and never frame locals."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog
import structlog.testing

from pdmesh.config import ServerConfig
from pdmesh.v1 import worker_pb2
from services.kvstore.registry_client import StoreReporter, scheduler_grace_s
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
    outage = Outage("scheduler", grace_s=5.0, clock=lambda: now[0])
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


def test_only_the_service_that_stops_keeps_a_lasting_outage_off_the_terminal() -> None:
    """Two stores of one process (the tests run several services in one) lose the scheduler; one
    of them is draining. Only its outage is not news: the flag is the service's, not the process's."""

    async def run() -> list[tuple[str, str]]:
        dead = "127.0.0.1:9"  # nothing listens: every report fails at once, over real gRPC
        info = worker_pb2.KVStoreInfo(store_id="s")
        stopping, serving = (StoreReporter(dead, info, None, grace_s=0.3) for _ in range(2))  # type: ignore[arg-type]
        stopping.draining = True
        with structlog.testing.capture_logs() as logs:
            for reporter in (stopping, serving):
                reporter.start()
            await asyncio.sleep(1.5)
            for reporter in (stopping, serving):
                await reporter.stop()
        return [(e["log_level"], e["event"]) for e in logs if "still unreachable" in e["event"]]

    levels = sorted(level for level, _ in asyncio.run(run()))
    assert levels == ["info", "warning"]


def test_the_stores_scheduler_grace_outlasts_the_workers_stop() -> None:
    # pdmesh up stops the store after the workers, which may take their stop timeout.
    assert scheduler_grace_s(ServerConfig(shutdown_grace_s=30)) > ServerConfig(shutdown_grace_s=30).stop_timeout_s
    assert scheduler_grace_s(ServerConfig(shutdown_grace_s=120)) > 120 + 15
    assert scheduler_grace_s(ServerConfig(shutdown_grace_s=5)) < scheduler_grace_s(ServerConfig(shutdown_grace_s=30))
