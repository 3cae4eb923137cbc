"""Lazy access to Triton for the kernel wrappers.

Triton is a GPU-extra dependency: the CPU production path (the torch references) must import and
run without it, so no module of kernels/ imports triton at the top. The Triton kernels live in
their own private modules (`_*_kernel.py`), imported on the first Triton launch.

Interpreter mode (`TRITON_INTERPRET=1`, Triton's own switch, read by Triton when a kernel is
decorated) runs those kernels on CPU tensors; tests use it in a subprocess of their own, since the
switch is fixed for a process once a kernel module has been imported.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch


@functools.cache
def triton_available() -> bool:
    """True when the triton package can be imported (the check does not import it)."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> ModuleType:
    """The triton module, or ValueError saying how to get it."""
    if not triton_available():
        raise ValueError("the Triton path needs the triton package: install pdmesh[gpu] (or use_triton=False)")
    import triton

    return triton


@functools.cache
def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Cached: Triton fixes the mode when a kernel is defined, so it cannot change once ours are.
    """
    triton = require_triton()
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors, except under the interpreter, which needs CPU ones."""
    want = "cpu" if interpreter_active() else "cuda"
    for t in tensors:
        if t.device.type != want:
            mode = "the Triton interpreter" if want == "cpu" else "a compiled Triton kernel"
            raise ValueError(f"{mode} needs {want} tensors, got one on {t.device}")


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
