"""Pooled contiguous byte buffers that packed KV layers travel in.

A request's blocks are scattered over the cache, so each message is gathered into one staging
buffer first (kernels.kv_pack). Buffers are kept and reused in power-of-two size classes, so a
steady stream of transfers allocates nothing; a burst larger than the pool allocates more (the
engine thread never waits on the network), and what comes back beyond `retain_bytes` is dropped.

Thread-safe: the engine thread acquires on the sending side, the transport thread releases.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass

import torch

_MIN_CLASS = 1 << 16


@dataclass(slots=True)
class Staging:
    buffer: torch.Tensor  # (capacity,) uint8, owned by the pool
    nbytes: int

    @property
    def data(self) -> torch.Tensor:
        """(nbytes,) uint8: the part in use."""
        return self.buffer[: self.nbytes]

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.data.view(dtype).view(shape)


class StagingPool:
    def __init__(self, device: torch.device, retain_bytes: int) -> None:
        self.device = device
        self.retain_bytes = retain_bytes
        self.allocations = 0  # buffers ever allocated: flat once transfers reach a steady state
        self.in_use = 0  # acquired and not yet released
        # Per size class, the most buffers ever in use at once. While nothing was dropped for
        # exceeding retain_bytes, allocations == sum(peak_in_use.values()): the pool allocated only
        # when more buffers of a class were in flight than ever before.
        self.peak_in_use: defaultdict[int, int] = defaultdict(int)
        self._in_use_by_class: defaultdict[int, int] = defaultdict(int)
        self._free: defaultdict[int, list[torch.Tensor]] = defaultdict(list)
        self._free_bytes = 0
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> Staging:
        capacity = max(_MIN_CLASS, 1 << (nbytes - 1).bit_length())
        with self._lock:
            self.in_use += 1
            in_class = self._in_use_by_class[capacity] = self._in_use_by_class[capacity] + 1
            self.peak_in_use[capacity] = max(self.peak_in_use[capacity], in_class)
            free = self._free[capacity]
            if free:
                self._free_bytes -= capacity
                return Staging(free.pop(), nbytes)
            self.allocations += 1
        return Staging(torch.empty(capacity, dtype=torch.uint8, device=self.device), nbytes)

    def release(self, staging: Staging) -> None:
        capacity = staging.buffer.numel()
        with self._lock:
            self.in_use -= 1
            self._in_use_by_class[capacity] -= 1
            if self._free_bytes + capacity <= self.retain_bytes:
                self._free[capacity].append(staging.buffer)
                self._free_bytes += capacity

    @property
    def free_bytes(self) -> int:
        return self._free_bytes
