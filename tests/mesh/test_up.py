"""`pdmesh up` as a user runs it, a real process with its real children: a port in use is refused
before anything starts, a worker killed with SIGKILL is restarted and the mesh serves again, no
child outlives `up` killed with SIGKILL, and the demo's answer reads cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from pdmesh.client import Client
from tests.mesh.conftest import HTTP_PORT_OFFSET, free_port_base

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


class Up:
    """`pdmesh up ...` in a subprocess, its stdout and stderr collected line by line."""

    def __init__(self, port: int, model: Path, *args: str, log_dir: Path) -> None:
        argv = [sys.executable, "-m", "pdmesh", "up", "--port", str(port), "--model", str(model),
                "--http-port", str(port + HTTP_PORT_OFFSET),  # never 8000: other runs may share the machine
                "--threads", "1", "--kv-blocks", "256", "--log-dir", str(log_dir), *args]  # fmt: skip
        self.target = f"127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.seen: set[int] = set()  # every child pid ever listed, for the cleanup
        self.out: list[str] = []
        self.err: list[str] = []
        self._pumps = [threading.Thread(target=_collect, args=(s, lines), daemon=True)
                       for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]  # fmt: skip
        for pump in self._pumps:
            pump.start()

    def wait_for(self, lines: list[str], text: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in lines):
            assert self.proc.poll() is None or any(text in line for line in lines), self.report()
            assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s\n{self.report()}"
            time.sleep(0.1)

    def finish(self, timeout_s: float = 120) -> int:
        code = self.proc.wait(timeout_s)
        for pump in self._pumps:
            pump.join(5)
        return code

    def children(self) -> dict[str, int]:
        """Worker id (or "scheduler") -> pid of every live child process of `up`."""
        found = {}
        for pid in _child_pids(self.proc.pid):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in argv:
                role = argv[argv.index(b"serve") + 1].decode()
                name = argv[argv.index(b"--worker-id") + 1].decode() if b"--worker-id" in argv else role
                found[name] = pid
        self.seen.update(found.values())
        return found

    def report(self) -> str:
        return "stdout:\n" + "".join(self.out) + "\nstderr:\n" + "".join(self.err)


def _collect(stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        lines.append(line)


def _child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    for task in tasks.iterdir() if tasks.exists() else ():
        with contextlib.suppress(FileNotFoundError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _generate(target: str, timeout_s: float = 180) -> list[int]:
    """Greedy tokens of one small request, retrying while the mesh is not (yet) serving."""
    deadline = time.monotonic() + timeout_s
    with Client(target) as client:
        while True:
            try:
                return client.complete([1, 2, 3, 4, 5], max_tokens=4, ignore_eos=True, timeout_s=60).token_ids
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                assert time.monotonic() < deadline, f"the mesh did not serve again: {e.details()}"
                time.sleep(1)


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path: Path, mesh_model: Path) -> None:
    port = free_port_base()
    taken = port + 101  # prefill-0's KV (UCX) port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        up = Up(port, mesh_model, log_dir=tmp_path)
        assert up.finish(60) == 1
    message = "".join(up.err)
    assert f"port {taken} (prefill-0's KV (UCX) port" in message and "already in use" in message
    assert "--port" in message, "the message says what to do"
    assert not list(tmp_path.glob("*-0.log")) and not (tmp_path / "scheduler.log").exists(), "nothing started"


def test_a_killed_worker_is_restarted_and_no_child_outlives_up(tmp_path: Path, mesh_model: Path) -> None:
    port = free_port_base()
    up = Up(port, mesh_model, log_dir=tmp_path)
    try:
        up.wait_for(up.out, "Ctrl-C stops the mesh")
        http = f"http://127.0.0.1:{port + HTTP_PORT_OFFSET}"
        assert f"OpenAI API: {http}/v1 (no key required: it listens on 127.0.0.1 only" in "".join(up.out)
        assert httpx.get(f"{http}/ready").json()["status"] == "ready"
        expected = _generate(up.target)
        before = up.children()
        assert set(before) == {"scheduler", "prefill-0", "decode-0", "kvstore-0"}

        os.kill(before["decode-0"], signal.SIGKILL)
        up.wait_for(up.err, "decode-0: exited (killed by SIGKILL)")
        assert "restart 1 in" in "".join(up.err)
        assert _generate(up.target) == expected, "the mesh serves again, the same tokens"
        after = up.children()
        assert after["decode-0"] != before["decode-0"] and after["scheduler"] == before["scheduler"]

        os.kill(up.proc.pid, signal.SIGKILL)
        up.finish()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in after.values()):
            assert time.monotonic() < deadline, "children outlived `pdmesh up`"
            time.sleep(0.1)
    finally:
        up.proc.kill()
        for pid in up.seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_demo_reads_cleanly_from_start_to_stop(tmp_path: Path) -> None:
    # What `make run` does, on the embedded SmolLM2 (the tiny test models have no chat template).
    up = Up(free_port_base(), Path("smollm2"), "--demo", "--exit-after-demo", log_dir=tmp_path)
    assert up.finish(300) == 0, up.report()
    out, err = "".join(up.out), "".join(up.err)
    assert "pdmesh is up" in out and "listening on 127.0.0.1 only" in out, up.report()
    assert "> What is the capital of France?\nThe capital of France is Paris.\n[8 tokens; TTFT" in out, up.report()
    assert "{" not in out, f"no log line inside the answer\n{up.report()}"
    # A worker whose report lands in the moment between the scheduler's exit and its own stop
    # finds nobody there: a moment's absence, kept in the full logs but off the terminal.
    shown = "".join(up.err)
    for noise in ("WARN", "unreachable", "Traceback", "never awaited", "was destroyed", '"level": "error"'):
        assert noise not in shown, f"{noise!r} on the terminal:\n{err}"
    assert (tmp_path / "decode-0.log").read_text().count('"event": "stopped"') == 1, "the full logs are kept"
