"""Unpacking a received payload into a ticket's blocks, and knowing when it is there.

The device work runs on the receiver's own CUDA stream per device, never on the default stream the
engine's step runs on, so it neither waits for a step nor makes a step wait for it. On CUDA the
transport's loop launches the unpack itself (one kernel) and waits for it in place when it is
small, a few tens of microseconds of copying, since a hop to a thread and back costs ~0.3 ms; a
larger unpack is waited for on the scatter thread, and host memory and payloads with sampled
checksums to verify (a read-back) are unpacked there, so the loop never waits long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from engine.cpu_threads import one_thread_here
from kernels.kv_pack import unpack_blocks
from kvtransfer.caches import KVCaches
from kvtransfer.checksum import first_mismatch
from kvtransfer.wire import Data

T = TypeVar("T")
_WAIT_ON_LOOP_BYTES = 64 << 20  # an unpack this small (~50 µs of copying on a GPU) is waited for on the loop


class Unpacker:
    """Used on the transport's loop; its scatter thread does the waits and checks the loop must not."""

    def __init__(self, loop: asyncio.AbstractEventLoop, one_torch_thread: bool = False) -> None:
        self._loop = loop
        self._scatter = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="kvtransfer-scatter", initializer=one_thread_here if one_torch_thread else None
        )
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # per CUDA device unpacked into

    def shutdown(self) -> None:
        """Wait for the unpacks on the scatter thread to finish."""
        self._scatter.shutdown(wait=True)

    def upload(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A ticket's block ids on the caches' device, copied on the stream its unpacks run on (so
        they are ordered after the copy) from pinned memory (so nothing here waits for it)."""
        if device.type != "cuda":
            return ids
        with torch.cuda.stream(self._stream(device)):
            return ids.to(device, non_blocking=True)

    async def unpack(self, payload: torch.Tensor, data: Data, caches: KVCaches, ids: torch.Tensor) -> int | None:
        """Unpack payload ((nbytes,) uint8, data's layers packed) into blocks `ids` (from upload) of
        caches and return once it is there; the first bad chunk instead when a sampled checksum does
        not match."""
        device = caches.tensors[0].device
        if device.type != "cuda" or data.checksums:
            return await self._loop.run_in_executor(self._scatter, self._check_and_unpack, payload, data, caches, ids)
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            _check_and_unpack_here(payload, data, caches, ids)
            unpacked = torch.cuda.Event()
            unpacked.record(stream)
        if data.nbytes <= _WAIT_ON_LOOP_BYTES:
            unpacked.synchronize()  # releases the GIL: the engine's thread runs on meanwhile
        else:
            await self._loop.run_in_executor(self._scatter, unpacked.synchronize)
        return None

    async def run(self, device: torch.device, read: Callable[..., T], *args: Any) -> T:
        """Run a read of caches on `device` on the scatter thread, on the receiver's own stream (a
        direct write's checksums), so it never waits for the engine's queued steps."""
        return await self._loop.run_in_executor(self._scatter, self._on_stream, device, read, *args)

    def _on_stream(self, device: torch.device, read: Callable[..., T], *args: Any) -> T:
        if device.type != "cuda":
            return read(*args)
        with torch.cuda.stream(self._stream(device)):
            return read(*args)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _check_and_unpack(self, payload: torch.Tensor, data: Data, caches: KVCaches, ids: torch.Tensor) -> int | None:
        """On the scatter thread: unpack() checking sampled checksums first; finished when this returns."""
        device = caches.tensors[0].device
        if device.type != "cuda":
            return _check_and_unpack_here(payload, data, caches, ids)
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            bad = _check_and_unpack_here(payload, data, caches, ids)
        stream.synchronize()
        return bad


def _check_and_unpack_here(payload: torch.Tensor, data: Data, caches: KVCaches, ids: torch.Tensor) -> int | None:
    if data.checksums:
        chunk_bytes = data.nbytes // (data.num_layers * 2 * data.num_blocks)  # one block of one layer's K or V
        bad = first_mismatch(payload, chunk_bytes, data.checksums)
        if bad is not None:
            return bad
    layout, tensors = caches.layout, caches.tensors
    layers = list(tensors[data.first_layer : data.first_layer + data.num_layers])
    shape = (data.num_layers, 2, data.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    unpack_blocks(payload.view(tensors[0].dtype).view(shape), layers, ids)
    return None
