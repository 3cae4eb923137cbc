"""Service logs: one JSON object per line, exceptions with their traceback and never frame locals."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from services.logging import configure_logging


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
