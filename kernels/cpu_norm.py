"""RMSNorm on CPU in C (kernels/cpu_rms_norm.c), for the engine's CPU steps.

Why: engine.model.RMSNorm is nine torch ops (~14 µs a call on one row, ~16 at 8), and a SmolLM2
step runs 61 of them: ~0.8 ms of a ~14.5 ms batch-1 step. The C version does the same arithmetic
in one call (~2.5 µs with the call). bfloat16 outputs equal the torch module's bit for bit (each
op rounds where torch's does; only the sum of squares runs in another order, which after the
rounding to bfloat16 did not show in tests); float32 ones may differ in the last place.
Compiled without floating-point contraction, so no multiply-add fuses two of torch's roundings.
Built and loaded by kernels/cpu_build.py; where it cannot be, the module keeps its torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from kernels.cpu_build import BuildError, load_library

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_rms_norm.c")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


class NativeRmsNorm:
    """weight * rms_normalised(x) for contiguous CPU rows of float32 or bfloat16."""

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.pdmesh_rms_norm
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                       ctypes.c_float]  # fmt: skip
        self._fn = fn

    @staticmethod
    def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            x.dtype in _DTYPE_CODES
            and weight.dtype == x.dtype
            and x.device.type == "cpu"
            and x.is_contiguous()
            and weight.is_contiguous()
            and x.shape[-1] == weight.shape[0]
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        dim = weight.shape[0]
        self._fn(_DTYPE_CODES[x.dtype], x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
        return out


@functools.cache
def native_rms_norm() -> NativeRmsNorm | None:
    """The compiled kernel, built on first use; None (logged once) where it cannot be built."""
    try:
        return NativeRmsNorm(load_library(_SOURCE, ("-ffp-contract=off",)))
    except BuildError as e:
        log.warning("CPU RMSNorm kernel unavailable, using torch's ops: %s", e)
        return None
