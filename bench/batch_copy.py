"""Can the copy engines move a ticket's scattered KV blocks? cuMemcpyBatchAsync against the peer copy.

Two GPUs: every (layer, K/V, block) piece of a ticket (Llama-3.1-8B shapes: 32 KiB each, scattered
over a 2,200-block pool on each side) copied GPU 1 -> GPU 0 by one `cuMemcpyBatchAsync` (the CUDA
driver's batched copy, CUDA 12.8+; the 13.0 signature as `_v2`), with the prefer-overlap flag off and
on, beside a contiguous torch peer copy of the same bytes. CUDA-event times, median of 10; the host
time of one submission; byte-exact checked.

    python3 bench/batch_copy.py          # on a machine with two GPUs, NVLink
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.copy_kernel_sweep import event_time  # noqa: E402

LAYERS, BLOCK_TOKENS, HEADS, HEAD_DIM, POOL = 32, 16, 8, 128, 2200
BLOCK_BYTES = BLOCK_TOKENS * HEADS * HEAD_DIM * 2
SRC, DST = torch.device("cuda:1"), torch.device("cuda:0")
SRC_ACCESS_ORDER_STREAM, LOCATION_DEVICE = 1, 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, CU_MEM_LOCATION_TYPE_DEVICE


class MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int), ("srcLocHint", MemLocation), ("dstLocHint", MemLocation),
        ("flags", ctypes.c_uint),
    ]  # fmt: skip


def batch_copier(driver: ctypes.CDLL) -> Callable[[np.ndarray, np.ndarray, np.ndarray, torch.cuda.Stream, int], None]:
    """cuMemcpyBatchAsync of (dsts, srcs, sizes) uint64 arrays on a stream, one attribute for all."""
    v2, v1 = getattr(driver, "cuMemcpyBatchAsync_v2", None), getattr(driver, "cuMemcpyBatchAsync", None)

    def copy(dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: torch.cuda.Stream, flags: int) -> None:
        src_hint, dst_hint = MemLocation(LOCATION_DEVICE, 1), MemLocation(LOCATION_DEVICE, 0)
        attr = MemcpyAttributes(SRC_ACCESS_ORDER_STREAM, src_hint, dst_hint, flags)
        index = (ctypes.c_size_t * 1)(0)
        arrays = tuple(x.ctypes.data_as(ctypes.c_void_p) for x in (dsts, srcs, sizes))
        count, handle = ctypes.c_size_t(len(sizes)), ctypes.c_void_p(stream.cuda_stream)
        if v2 is not None:  # CUDA 13: no failIdx
            result = v2(*arrays, count, ctypes.byref(attr), index, ctypes.c_size_t(1), handle)
        else:
            failed = ctypes.c_size_t(0)
            result = v1(*arrays, count, ctypes.byref(attr), index, ctypes.c_size_t(1), ctypes.byref(failed), handle)
        if result != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync returned CUresult {result}")

    return copy


def piece_addresses(caches: list[torch.Tensor], ids: list[int]) -> np.ndarray:
    """Each (layer, K/V, block) piece's device address, layer-major as a message packs them."""
    bases = [kv.data_ptr() for kv in caches]
    return np.array(
        [base + (kv * POOL + b) * BLOCK_BYTES for base in bases for kv in (0, 1) for b in ids], dtype=np.uint64
    )


def main() -> None:
    shape = (2, POOL, BLOCK_TOKENS, HEADS, HEAD_DIM)
    src = [torch.randn(shape, device=SRC).bfloat16() for _ in range(LAYERS)]
    dst = [torch.zeros(shape, device=DST, dtype=torch.bfloat16) for _ in range(LAYERS)]
    torch.zeros(4, device=DST).copy_(torch.zeros(4, device=SRC))  # enables peer access 1 -> 0
    torch.cuda.set_device(SRC)  # the driver call runs in the current context: the stream's
    driver = ctypes.CDLL("libcuda.so.1")
    version = ctypes.c_int()
    driver.cuDriverGetVersion(ctypes.byref(version))
    print("driver", version.value, "cuMemcpyBatchAsync_v2:", hasattr(driver, "cuMemcpyBatchAsync_v2"))
    copy = batch_copier(driver)
    stream = torch.cuda.Stream(SRC)
    for tokens in (1024, 4096, 16384):
        n = tokens // BLOCK_TOKENS
        generator = torch.Generator().manual_seed(tokens)
        src_ids = torch.randperm(POOL, generator=generator)[:n].tolist()
        dst_ids = torch.randperm(POOL, generator=generator)[:n].tolist()
        started = time.perf_counter()
        srcs = piece_addresses(src, src_ids)
        dsts = piece_addresses(dst, dst_ids)
        sizes = np.full(len(srcs), BLOCK_BYTES, dtype=np.uint64)
        built = time.perf_counter() - started
        nbytes = int(sizes.sum())
        a = torch.empty(nbytes, dtype=torch.uint8, device=SRC)
        b = torch.empty(nbytes, dtype=torch.uint8, device=DST)
        with torch.cuda.stream(stream):
            engine = event_time(lambda a=a, b=b: b.copy_(a), stream, iters=10, warmup=2)
        for flags in (0, 1):  # 1: CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE
            with torch.cuda.stream(stream):
                copy(dsts, srcs, sizes, stream, flags)
                stream.synchronize()
                seconds = event_time(
                    lambda f=flags, d=dsts, s=srcs, z=sizes: copy(d, s, z, stream, f), stream, iters=10, warmup=2
                )
                started = time.perf_counter()
                copy(dsts, srcs, sizes, stream, flags)
                host = time.perf_counter() - started
                stream.synchronize()
            exact = all(
                torch.equal(dst[layer][:, dst_ids], src[layer][:, src_ids].to(DST)) for layer in (0, LAYERS - 1)
            )
            print(
                f"tokens {tokens:>6} pieces {len(sizes):>6}: peer copy {nbytes / engine / 1e9:6.1f} GB/s;"
                f" batch (flags={flags}) {nbytes / seconds / 1e9:6.1f} GB/s = {engine / seconds:5.1%} of it,"
                f" host submission {host * 1e6:.0f} us, arrays built {built * 1e6:.0f} us, exact={exact}"
            )


if __name__ == "__main__":
    main()
