"""A worker or KV store told to stop (SIGTERM) ends within its budget, its grace plus STOP_MARGIN_S,
after which `pdmesh up` SIGKILLs it, even when its KV transport's thread never stops: it waits
KV_CLOSE_S for that thread, logs it, and exits (the thread is a daemon). Real processes (a prefill
worker on the tiny model, a KV store), their transport's loop blocked by a test hook
(stuck_transport_worker.py); no scheduler answers them, so that nothing else holds their stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdmesh.config import KV_CLOSE_S, STOP_MARGIN_S

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
STARTUP_S = 120.0
GRACE_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(proc: subprocess.Popen[str], event: str, timeout_s: float) -> list[str]:
    """The process's output up to its JSON log line of `event`."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "it exited during start-up:\n" + "".join(lines)
        lines.append(line)
        if line.startswith("{") and json.loads(line)["event"] == event:
            return lines
    raise TimeoutError(f"no {event!r} within {timeout_s} s")


def _argv(service: str, model: Path) -> tuple[list[str], str]:
    """The command line of `pdmesh serve <service>` behind the hook, and its ready event."""
    common = ["--host", "127.0.0.1", "--port", str(_free_port()), "--kv-port", str(_free_port()),
              "--shutdown-grace-s", str(GRACE_S)]  # fmt: skip
    if service == "kvstore":
        return ["kvstore", *common, "--scheduler", ""], "kvstore ready"
    worker = ["--scheduler", f"127.0.0.1:{_free_port()}", "--model", str(model), "--threads", "1",
              "--kv-blocks", "64", "--block-size", "4"]  # fmt: skip
    return [service, *common, *worker], "worker ready"


@pytest.mark.parametrize("service", ["prefill", "kvstore"])
def test_a_process_whose_kv_transport_never_stops_still_stops_within_its_budget(service: str, tiny_llama: Path) -> None:
    args, ready = _argv(service, tiny_llama)
    argv = [sys.executable, str(ROOT / "tests/services/worker/stuck_transport_worker.py"), "serve", *args]
    env = {
        **os.environ, "PYTHONUNBUFFERED": "1", "PDMESH_TELEMETRY_LOG_FORMAT": "json",
        "PDMESH_KVSTORE_MEMORY_BYTES": str(4 << 20),
    }  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _ready(proc, ready, STARTUP_S)
        proc.send_signal(signal.SIGTERM)
        told = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - told
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [e for e in events if e["event"] == "kv transport loop blocked"], "the hook blocked nothing"
    (gave_up,) = [e for e in events if e["event"] == "kv transport thread did not stop"]
    assert gave_up["timeout_s"] == KV_CLOSE_S
    assert proc.returncode == 0
    assert took < GRACE_S + STOP_MARGIN_S  # what `pdmesh up` waits before SIGKILL (the close alone took 30 s)
