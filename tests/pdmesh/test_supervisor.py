"""The supervisor with small real child processes: exits are logged with their cause and
restarted with backoff, repeated fast failures and configuration errors give up, stops go in
order with escalation, and no child outlives a supervisor killed with SIGKILL."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pdmesh.process_output import Echo, ProcessOutput
from pdmesh.supervisor import EX_CONFIG, ChildSpec, RestartPolicy, Supervisor

FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, min_uptime_s=5.0, max_fast_failures=3)


def python(name: str, code: str) -> ChildSpec:
    return ChildSpec(name, (sys.executable, "-c", textwrap.dedent(code)))


def wait_until(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_child_that_exits_is_restarted_and_the_cause_is_logged(tmp_path: Path) -> None:
    stream = io.StringIO()
    runs = tmp_path / "runs"
    # The first two runs fail (exit code 3), the third stays up.
    child = python("worker", f"""
        import pathlib, time
        runs = pathlib.Path({str(runs)!r})
        n = len(runs.read_text()) if runs.exists() else 0
        runs.write_text("x" * (n + 1))
        print('{{"event": "started", "level": "info"}}', flush=True)
        if n < 2:
            raise SystemExit(3)
        time.sleep(60)
    """)  # fmt: skip
    sup = Supervisor([child], FAST, ProcessOutput(Echo.WARNINGS, tmp_path / "logs", stream))
    sup.start()
    try:
        wait_until(lambda: runs.exists() and len(runs.read_text()) == 3 and sup.children["worker"].pid is not None)
        assert sup.children["worker"].restarts == 2
        assert sup.failure is None
    finally:
        sup.stop([["worker"]], timeout_s=10)
    shown = stream.getvalue()
    assert "worker: exited (exit code 3) after" in shown and "restart 1 in" in shown and "restart 2 in" in shown
    assert '"started"' not in shown, "info lines stay out of the terminal"
    assert (tmp_path / "logs" / "worker.log").read_text().count('"started"') == 3, "but go to the log file"


def test_a_killed_child_is_reported_with_its_signal_and_comes_back(tmp_path: Path) -> None:
    stream = io.StringIO()
    sup = Supervisor([python("decode-0", "import time; time.sleep(60)")], FAST, ProcessOutput(stream=stream))
    sup.start()
    try:
        wait_until(lambda: sup.children["decode-0"].pid is not None)
        first = sup.children["decode-0"].pid
        sup.kill("decode-0")
        wait_until(lambda: sup.children["decode-0"].pid not in (None, first))
    finally:
        sup.stop([["decode-0"]], timeout_s=10)
    assert "decode-0: exited (killed by SIGKILL) after" in stream.getvalue()
    assert "restart 1 in" in stream.getvalue()


def test_repeated_fast_failures_give_up_and_say_why() -> None:
    reasons: list[str] = []
    given_up = threading.Event()

    def on_give_up(reason: str) -> None:
        reasons.append(reason)
        given_up.set()

    stream = io.StringIO()
    sup = Supervisor([python("scheduler", "raise SystemExit(1)")], FAST, ProcessOutput(stream=stream), on_give_up)
    sup.start()
    assert given_up.wait(30)
    sup.stop([["scheduler"]], timeout_s=5)
    assert sup.children["scheduler"].restarts == FAST.max_fast_failures - 1
    assert reasons == [sup.failure]
    assert "scheduler exited (exit code 1)" in reasons[0] and "3th failure in a row" in reasons[0]


def test_a_configuration_error_is_never_restarted() -> None:
    sup = Supervisor([python("prefill-0", f"raise SystemExit({EX_CONFIG})")], FAST, ProcessOutput(stream=io.StringIO()))
    sup.start()
    wait_until(lambda: sup.failure is not None)
    sup.stop([["prefill-0"]], timeout_s=5)
    assert sup.children["prefill-0"].restarts == 0
    assert "configuration error" in str(sup.failure) and "cannot fix" in str(sup.failure)


def test_stop_goes_group_by_group_and_kills_what_outstays_the_grace(tmp_path: Path) -> None:
    order = tmp_path / "order"
    drains = f"""
        import pathlib, signal, sys, time
        def term(*_):
            with open({str(order)!r}, "a") as f:
                f.write(sys.argv[1] + " ")
            time.sleep(0.3)
            sys.exit(0)
        signal.signal(signal.SIGTERM, term)
        time.sleep(60)
    """
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    specs = [
        ChildSpec("scheduler", (sys.executable, "-c", textwrap.dedent(drains), "scheduler")),
        ChildSpec("worker", (sys.executable, "-c", textwrap.dedent(drains), "worker")),
        python("stubborn", stubborn),
    ]
    sup = Supervisor(specs, FAST, ProcessOutput(stream=io.StringIO()))
    sup.start()
    wait_until(lambda: all(c.pid is not None for c in sup.children.values()))
    time.sleep(0.5)  # the signal handlers are installed
    started = time.monotonic()
    sup.stop([["scheduler"], ["worker", "stubborn"]], timeout_s=1.0)
    assert order.read_text() == "scheduler worker "
    assert time.monotonic() - started < 10
    assert all(c.pid is None for c in sup.children.values())


def test_no_child_outlives_a_supervisor_killed_with_sigkill(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from pdmesh.process_output import ProcessOutput
        from pdmesh.supervisor import ChildSpec, RestartPolicy, Supervisor
        sleeper = (sys.executable, "-c", "import time; time.sleep(120)")
        sup = Supervisor([ChildSpec(f"c{{i}}", sleeper) for i in range(3)], RestartPolicy(), ProcessOutput())
        sup.start()
        while not all(c.pid for c in sup.children.values()):
            time.sleep(0.02)
        open({str(pids)!r}, "w").write(" ".join(str(c.pid) for c in sup.children.values()))
        time.sleep(120)
    """
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    try:
        wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 3)
        children = [int(p) for p in pids.read_text().split()]
        assert all(_alive(p) for p in children)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not any(_alive(p) for p in children), timeout_s=10)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by init


@pytest.mark.parametrize(("returncode", "text"), [(0, "exit code 0"), (-9, "killed by SIGKILL"), (78, "configuration")])
def test_exit_causes_read_plainly(returncode: int, text: str) -> None:
    from pdmesh.supervisor import ExitCause

    assert text in str(ExitCause(returncode))
