"""Where the output of the mesh's processes goes: a log file per process, and the terminal.

Services log one JSON object per line (services/logging.py). On the terminal `pdmesh up` shows
only what a person should read while the mesh runs: warnings and errors, anything that is not a
JSON log line (a traceback, a C library's complaint), and the supervisor's own notes (exits,
restarts). Everything goes to `<log_dir>/<name>.log` as it came. `Echo.ALL` shows every line
behind its process's name instead (tests, `pdmesh up --verbose`).
"""

from __future__ import annotations

import contextlib
import enum
import json
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import IO

_LOUD_LEVELS = frozenset({"warning", "error", "critical", "exception"})
_NAME_WIDTH = 10


class Echo(enum.Enum):
    ALL = "all"  # every line of every process
    WARNINGS = "warnings"  # warnings, errors, non-JSON lines and supervisor notes


class ProcessOutput:
    def __init__(self, echo: Echo = Echo.ALL, log_dir: Path | None = None, stream: IO[str] | None = None) -> None:
        self.echo = echo
        self.log_dir = log_dir
        self._stream = stream
        self._lock = threading.Lock()
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)

    def pump(self, name: str, pipe: Iterable[bytes] | None) -> None:
        """Copy a process's output until it closes (on a thread of its own)."""
        if pipe is None:
            return
        with self._file(name) as log:
            for raw in pipe:
                line = raw.decode(errors="replace")
                if log is not None:
                    log.write(line)
                    log.flush()
                if self.echo is Echo.ALL or _worth_showing(line):
                    self._show(name, line)

    def note(self, name: str, text: str) -> None:
        """The supervisor's own line about a process: always shown, and kept in up.log."""
        line = f"{name} {text}\n" if name else f"{text}\n"
        if self.log_dir is not None:
            with self._lock, open(self.log_dir / "up.log", "a") as log:
                log.write(line)
        self._show("up", f"{name}: {text}\n" if name else line)

    def log_path(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir is not None else None

    def _file(self, name: str) -> contextlib.AbstractContextManager[IO[str] | None]:
        path = self.log_path(name)
        return open(path, "a") if path is not None else contextlib.nullcontext()

    def _show(self, name: str, line: str) -> None:
        stream = self._stream or sys.stderr
        with self._lock:
            stream.write(f"{name:>{_NAME_WIDTH}} | {line}")
            stream.flush()


def _worth_showing(line: str) -> bool:
    if not line.startswith("{"):
        return bool(line.strip())
    try:
        level = json.loads(line).get("level", "")
    except (ValueError, AttributeError):
        return True
    return str(level).lower() in _LOUD_LEVELS
