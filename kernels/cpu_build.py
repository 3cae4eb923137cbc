"""Builds the CPU kernels written in C (kernels/*.c) with the machine's C compiler and loads them
through ctypes (kernels/cpu_native.py, kernels/cpu_norm.py).

Why C through ctypes rather than a torch C++ extension: a file that includes torch's headers
takes a minute to compile on a 2-core machine, every time the source or torch changes; these
include nothing beyond libc and compile in a fraction of a second. Each shared object is cached
per user under ~/.cache/pdmesh/kernels (else a private directory under the temp directory),
named by a hash of its source and the headers beside it (kernels/cpu_bf16.h), the compiler, the
flags and the CPU's feature flags (it is built with -march=native). ctypes releases the GIL for
each call, so a worker's event loop runs while a kernel does.

Where nothing can be built (no compiler, no writable directory) load_library raises BuildError
and the callers keep their torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

_FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared")
# Tried in order: OpenMP (a kernel that splits its work between the calling thread's torch
# threads; libgomp.so.1 resolves to torch's, already loaded, so one pool) and this CPU's
# instructions, then without each where the compiler refuses (no libgomp, no -march=native).
_LADDER = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())


class BuildError(RuntimeError):
    """A kernel could not be compiled or loaded here."""


@functools.cache
def load_library(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled `source`, built now unless cached; BuildError where it cannot be."""
    if platform.system() != "Linux":
        raise BuildError(f"kernels are built on Linux only, not {platform.system()}")
    try:
        return ctypes.CDLL(str(_build(source, extra_flags)))
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(str(e)) from e


def _build(source: Path, extra_flags: Sequence[str]) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise BuildError("no C compiler (cc, gcc or clang) on PATH")
    # The headers beside the source count: a kernel that includes one is rebuilt when it changes.
    text = b"\0".join(p.read_bytes() for p in [source, *sorted(source.parent.glob("*.h"))])
    error = ""
    for rung in _LADDER:
        flags = [*rung, *_FLAGS, *extra_flags]
        key = hashlib.sha256(b"\0".join([text, compiler.encode(), " ".join(flags).encode(), _cpu_flags()]))
        target = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            command = [compiler, *flags, "-o", tmp, str(source)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: processes building at once each see a whole file
                return target
            error = done.stderr.strip()[-500:]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BuildError(f"{compiler} failed on {source.name}: {error}")


def _cache_dir() -> Path:
    """~/.cache/pdmesh/kernels, else a per-user directory under the temp directory: one this user
    owns and nobody else may write (a shared object found there is loaded into the process)."""
    try:
        bases = [Path.home() / ".cache" / "pdmesh", Path(tempfile.gettempdir()) / f"pdmesh-{os.getuid()}"]
    except RuntimeError:  # no home directory
        bases = [Path(tempfile.gettempdir()) / f"pdmesh-{os.getuid()}"]
    for base in bases:
        path = base / "kernels"
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = path.stat()
        except OSError:
            continue
        if info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and os.access(path, os.W_OK):
            return path
    raise BuildError("no private writable cache directory for the compiled kernels")


def _cpu_flags() -> bytes:
    """The CPU's feature flags (Linux): a -march=native build is only reused on the same kind of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.machine().encode()
