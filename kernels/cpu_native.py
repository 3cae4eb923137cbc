"""CPU decode attention in C (kernels/cpu_decode_attention.c), built with the machine's C compiler
at first use and called through ctypes; None where it cannot be built, and the caller keeps the
torch path (kernels/paged_attention_cpu.py).

Why a kernel of our own: torch's CPU flash SDPA spends ~10 µs per (sequence, KV head) item on a
decode row (its per-block GEMM calls, buffers and conversions), ~250 µs a layer at batch 8 and
~0.9 ms at batch 32 for SmolLM2's 3 KV heads and ~300 keys, plus the gather that copies every
row's blocks out first; batched matmuls have the same per-item cost and round bfloat16 scores
(BENCHMARKS.md, "Where a CPU decode step goes"). vLLM's CPU backend has a C++ paged-attention
kernel of its own for the same reason. This one reads K and V once, straight from the paged
cache, in float32 (bfloat16 operands widened exactly), ~3x faster than gather + SDPA. How it is
built and loaded: kernels/cpu_build.py.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from kernels.cpu_build import BuildError, load_library

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_decode_attention.c")
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_GROUP, _MAX_HEAD_DIM, _MAX_HEADS = 16, 256, 256  # the kernel's limits (MAX_GROUP, MAX_CHUNKS * 16, MAX_HEADS)


class NativeDecodeAttention:
    """paged decode attention for CPU tensors through the compiled kernel."""

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.pdmesh_decode_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int] * 7, ctypes.c_float]
        self._fn = fn

    @staticmethod
    def supports(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
        """q (batch, heads, head_dim) and kv_layer (2, blocks, block_size, kv_heads, head_dim)."""
        return q.dtype == kv_layer.dtype and q.shape[2] == kv_layer.shape[4] and supports_layer(kv_layer, q.shape[1])

    def __call__(
        self,
        q: torch.Tensor,  # (batch, heads, head_dim)
        kv_layer: torch.Tensor,  # (2, num_blocks, block_size, kv_heads, head_dim), contiguous
        block_tables: torch.Tensor,  # (batch, max_blocks) int32, contiguous, ids < num_blocks
        context_lens: torch.Tensor,  # (batch,) int32, each <= max_blocks * block_size
        scale: float,
    ) -> torch.Tensor:  # (batch, heads, head_dim), q's dtype
        """The caller vouches for the tables (the kernel reads what they point at, unchecked):
        plan_decode checks them once per step."""
        q = q.contiguous()
        out = torch.empty_like(q)
        batch, heads, head_dim = q.shape
        _, num_blocks, block_size, kv_heads, _ = kv_layer.shape
        code = self._fn(
            _DTYPE_CODES[q.dtype], q.data_ptr(), kv_layer.data_ptr(), out.data_ptr(),
            block_tables.data_ptr(), context_lens.data_ptr(),
            batch, block_tables.shape[1], num_blocks, block_size, heads, kv_heads, head_dim, scale,
        )  # fmt: skip
        if code != 0:
            raise RuntimeError(f"CPU decode attention kernel failed with code {code}")
        return out


def supports_layer(kv_layer: torch.Tensor, num_heads: int) -> bool:
    """Whether the kernel takes a model with `num_heads` query heads over this layer's cache."""
    kv_heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
    return (
        kv_layer.dtype in _DTYPE_CODES
        and kv_layer.device.type == "cpu"
        and kv_layer.is_contiguous()
        and head_dim % 16 == 0
        and head_dim <= _MAX_HEAD_DIM
        and num_heads % kv_heads == 0
        and num_heads // kv_heads <= _MAX_GROUP
        and num_heads <= _MAX_HEADS
    )


def native_attention_for(kv_layer: torch.Tensor, num_heads: int) -> NativeDecodeAttention | None:
    """The kernel for a model's cache, built now (at load, not in the first step); None where the
    shapes or dtype are not the kernel's or it cannot be built."""
    return native_decode_attention() if supports_layer(kv_layer, num_heads) else None


@functools.cache
def native_decode_attention() -> NativeDecodeAttention | None:
    """The compiled kernel, built on first use; None (logged once) where no compiler can build it."""
    try:
        return NativeDecodeAttention(load_library(_SOURCE))
    except BuildError as e:
        log.warning("CPU decode attention kernel unavailable, using torch's SDPA path: %s", e)
        return None
