"""A ticket's block ids: inline in a grant (base64 of little-endian int64), and onto a device.

A direct-write grant over a side channel carries the ticket's block ids in the Granted itself
(side.py), sparing the tagged payload and its receive (~1.4 ms from grant to armed on two H100s).
Both ends of a direct write upload ids with PinnedIds: numpy fills a pinned host buffer kept for
reuse (torch.tensor of a 1k-id list costs ~4x numpy's fill; pinning a fresh buffer ~0.4 ms:
engine/uploader.py), and one non-blocking copy on the current stream takes it to the device, so the
caller never waits for the stream. A buffer is reused only once the copy that read it has finished
(an event per slot); when every slot is still being read, a fresh one is pinned instead of waiting.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Sequence

import numpy as np
import torch

_SLOTS = 4  # pinned buffers kept in turn: a copy may still read one while the next fills another
_MIN_IDS = 4096  # a slot's first size: a 64k-token ticket at 16 tokens a block


def encode_ids(ids: torch.Tensor) -> str:
    """(n,) int64 host ids as base64 of their little-endian bytes."""
    return base64.b64encode(ids.numpy().astype("<i8", copy=False).tobytes()).decode("ascii")


def decode_ids(text: str, count: int) -> np.ndarray:
    """(count,) int64 ids from encode_ids' text; ValueError if it is not exactly that many."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"block ids that are not base64: {e}") from e
    if len(raw) != 8 * count:
        raise ValueError(f"{len(raw) / 8:g} block ids for a ticket of {count} blocks")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64, copy=False)


class PinnedIds:
    """Block ids onto one device, queued on the current stream without waiting (any thread)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._lock = threading.Lock()
        self._buffers: list[tuple[torch.Tensor, np.ndarray] | None] = [None] * _SLOTS  # int64, pinned
        self._read: list[torch.cuda.Event | None] = [None] * _SLOTS  # recorded after each slot's last copy
        self._next = 0

    def upload(self, ids: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(n,) int64 on the device; on the host (a fresh tensor) when the device is the CPU."""
        if not self._pinned:
            return torch.from_numpy(np.array(ids, dtype=np.int64))
        n = len(ids)
        with self._lock:
            slot = self._free_slot()
            if slot is None:  # every kept buffer is still being read: the host allocator keeps this one until read
                host = torch.empty(n, dtype=torch.int64, pin_memory=True)
                host.numpy()[:] = ids
                return host.to(self.device, non_blocking=True)
            buffer, array = self._buffer(slot, n)
            array[:n] = ids
            ids_on_device = buffer[:n].to(self.device, non_blocking=True)
            read = torch.cuda.Event()
            read.record(torch.cuda.current_stream(self.device))  # the copy's stream
            self._read[slot] = read
            return ids_on_device

    def _free_slot(self) -> int | None:
        """Under the lock: the next slot no copy reads any more (query() keeps the GIL, never waits)."""
        for i in range(_SLOTS):
            slot = (self._next + i) % _SLOTS
            read = self._read[slot]
            if read is None or read.query():
                self._next = (slot + 1) % _SLOTS
                return slot
        return None

    def _buffer(self, slot: int, n: int) -> tuple[torch.Tensor, np.ndarray]:
        entry = self._buffers[slot]
        if entry is None or entry[1].size < n:
            buffer = torch.empty(max(n, _MIN_IDS), dtype=torch.int64, pin_memory=True)
            entry = self._buffers[slot] = (buffer, buffer.numpy())
        return entry
