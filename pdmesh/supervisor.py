"""Supervision of the mesh's processes: start each, watch it, restart it with backoff, stop in order.

One `Child` per process, each watched by a thread of its own that starts the process, waits for
it and decides what its exit means:
- it exited while the mesh runs: log the cause (exit code or signal), its uptime and the restart
  count, then start it again after a backoff that doubles with each fast failure in a row (a run
  shorter than `min_uptime_s`);
- `max_fast_failures` fast failures in a row, or exit code EX_CONFIG (78: `pdmesh serve` found
  its configuration unusable, which no restart fixes): give up and tell the owner, who stops the
  whole mesh, rather than restart-looping forever;
- the owner is stopping it: nothing more.

Children die with the supervisor however it dies. A normal exit stops them in order (stop());
for the deaths that run no code at all (SIGKILL, a segfault, the OOM killer) each child asks the
kernel to SIGKILL it when its parent goes (Linux PR_SET_PDEATHSIG). The request is made by a
few lines of Python that the child runs first and that then exec the real command (the setting
survives exec): a preexec_fn would do the same between fork and exec, but it makes subprocess
fork a process full of gRPC threads, which gRPC complains about on stderr and which is unsafe.
Two details make it reliable: the death signal follows the *thread* that forked the child, so
each child is forked by its own watcher thread, which outlives the child; and a parent that died
before prctl ran is caught by comparing getppid() with the supervisor's pid. SIGKILL rather than
SIGTERM because nobody is left to escalate after a grace, and only SIGKILL frees the ports at once.

Each child leads its own process group (so a terminal's Ctrl-C reaches only the supervisor, which
then stops the children in order), and whatever the child left behind in its group is killed
once the child is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pdmesh.process_output import ProcessOutput

EX_CONFIG = 78  # sysexits.h: configuration error; `pdmesh serve` exits with it when its settings are unusable


@dataclass(frozen=True)
class ChildSpec:
    """One process of the mesh: its name in logs, its command line and extra environment."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RestartPolicy:
    restart: bool = True  # False: an exited child is reported and left down (failure tests)
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 16.0
    min_uptime_s: float = 30.0  # a run shorter than this is a fast failure
    max_fast_failures: int = 5  # in a row: give up and stop the mesh

    def backoff_s(self, fast_failures: int) -> float:
        """The delay before the next start: doubling with each fast failure in a row."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(0, fast_failures - 1))


@dataclass(frozen=True)
class ExitCause:
    returncode: int  # Popen's: negative for a signal

    @property
    def signal(self) -> signal.Signals | None:
        return signal.Signals(-self.returncode) if self.returncode < 0 else None

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {self.signal.name}"
        if self.returncode == EX_CONFIG:
            return f"exit code {EX_CONFIG} (configuration error)"
        return f"exit code {self.returncode}"


class Child:
    """One supervised process. start() once; stop_requested() then send() a signal to stop it."""

    def __init__(
        self, spec: ChildSpec, policy: RestartPolicy, output: ProcessOutput, on_give_up: Callable[[str], None]
    ) -> None:
        self.spec = spec
        self.restarts = 0
        self._policy = policy
        self._output = output
        self._on_give_up = on_give_up
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch-{spec.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The latest process started for this child, running or not."""
        return self._proc

    def start(self) -> None:
        """Start watching (and so running) the child; again after it stayed down, a fresh run."""
        if self.pid is not None:
            raise RuntimeError(f"{self.name} is still running; kill it first")
        if self._thread.ident is not None:  # a thread runs once: a new one for a new run
            self._thread.join(10)  # the watcher of the last run finishing its notes
            self._thread = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)
        self._stopping.clear()
        self._thread.start()

    def stop_requested(self) -> None:
        """From now on an exit is expected: no restart."""
        self._stopping.set()

    def send(self, sig: signal.Signals) -> None:
        """Send `sig` to the running process's group, if a process runs."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)

    def wait_exited(self, timeout_s: float) -> bool:
        """Until the current process has exited (not until a restart); False on timeout."""
        proc = self._proc
        if proc is None:
            return True
        try:
            proc.wait(max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            return False
        return True

    def join(self, timeout_s: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- the watcher thread
    def _watch(self) -> None:
        fast_failures = 0
        while True:
            proc = self._spawn()
            if proc is None:
                return
            started = time.monotonic()
            pump = threading.Thread(
                target=self._output.pump, args=(self.name, proc.stdout), name=f"log-{self.name}", daemon=True
            )
            pump.start()
            cause = ExitCause(proc.wait())
            uptime = time.monotonic() - started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group
            pump.join(5)
            if self._stopping.is_set():
                if cause.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
                    self._output.note(self.name, f"stopped: {cause}")
                return
            fast_failures = fast_failures + 1 if uptime < self._policy.min_uptime_s else 0
            if not self._after_exit(cause, uptime, fast_failures):
                return

    def _after_exit(self, cause: ExitCause, uptime: float, fast_failures: int) -> bool:
        """Log the exit and decide: True after waiting out the backoff to restart, False to stay down."""
        what = f"exited ({cause}) after {uptime:.1f} s"
        if not self._policy.restart:
            self._output.note(self.name, f"{what}; not restarted (restarts are off)")
            return False
        reason = None
        if cause.returncode == EX_CONFIG:
            reason = f"{self.name} {what}: its settings are unusable and a restart cannot fix them"
        elif fast_failures >= self._policy.max_fast_failures:
            reason = (f"{self.name} {what}, the {fast_failures}th failure in a row within "
                      f"{self._policy.min_uptime_s:.0f} s of starting")  # fmt: skip
        if reason is not None:
            self._output.note(self.name, f"{what}; giving up")
            self._on_give_up(reason)
            return False
        delay = self._policy.backoff_s(fast_failures)
        self._output.note(self.name, f"{what}; restart {self.restarts + 1} in {delay:.1f} s")
        if self._stopping.wait(delay):
            return False
        self.restarts += 1
        return True

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._stopping.is_set():
                return None
            self._proc = subprocess.Popen(
                _die_with_parent(self.spec.argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **dict(self.spec.env), "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
            return self._proc


# Run by the child before its command: SIGKILL on the parent's death, then exec the command.
_DEATH_SIGNAL_THEN_EXEC = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL\n"
    "if os.getppid() != int(sys.argv[1]):  # the parent died before prctl: no signal will come\n"
    "    os._exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _die_with_parent(argv: tuple[str, ...]) -> list[str]:
    """argv, run so that the kernel SIGKILLs it when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    executable = shutil.which(argv[0]) or argv[0]
    return [sys.executable, "-S", "-c", _DEATH_SIGNAL_THEN_EXEC, str(os.getpid()), executable, *argv[1:]]


class Supervisor:
    """The children of one mesh. `failure` is set (and on_give_up called) when one gives up."""

    def __init__(
        self,
        specs: Iterable[ChildSpec],
        policy: RestartPolicy,
        output: ProcessOutput,
        on_give_up: Callable[[str], None] | None = None,
    ) -> None:
        self.children = {s.name: Child(s, policy, output, self._give_up) for s in specs}
        self.failure: str | None = None
        self.on_give_up = on_give_up

    def start(self) -> None:
        for child in self.children.values():
            child.start()

    def restart(self, name: str, env: tuple[tuple[str, str], ...] = ()) -> None:
        """Start a child that stayed down (restarts off, or given up) again with its own command,
        `env` added to its environment from now on."""
        child = self.children[name]
        if env:
            child.spec = dataclasses.replace(child.spec, env=(*child.spec.env, *env))
        child.start()

    def kill(self, name: str, timeout_s: float = 30.0) -> None:
        """SIGKILL one child's process, no drain, and wait until it is gone (a restart may follow)."""
        child = self.children[name]
        child.send(signal.SIGKILL)
        child.wait_exited(timeout_s)

    def stop(self, order: Iterable[Iterable[str]], timeout_s: float) -> None:
        """Stop the children group by group: SIGTERM (each drains), SIGKILL what outstays timeout_s."""
        for group in order:
            children = [self.children[n] for n in group]
            for child in children:
                child.stop_requested()
                child.send(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for child in children:
                if not child.wait_exited(deadline - time.monotonic()):
                    child.send(signal.SIGKILL)
                    child.wait_exited(10)
        for child in self.children.values():
            child.join(10)

    def kill_all(self) -> None:
        """SIGKILL every child now (a second Ctrl-C)."""
        for child in self.children.values():
            child.stop_requested()
            child.send(signal.SIGKILL)

    def _give_up(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            if self.on_give_up is not None:
                self.on_give_up(reason)
