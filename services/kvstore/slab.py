"""The memory tier of one KV layout: a slab of host memory cut into block slots.

The slab is laid out as a worker's paged KV cache (one (2, slots, block_size, kv_heads, head_dim)
tensor per layer), so kvtransfer lands offered blocks in it and packs fetched blocks out of it
exactly as it does for an engine's cache. Its memory is an arena the store allocated beforehand
(memory.HostMemory: in /dev/shm, pinned when a GPU is present), cut into one view per layer, so making a slab
costs nothing. Free slots are handed out lowest first: unpinned, the untouched tail of the arena
never becomes resident.
"""

from __future__ import annotations

import heapq

import torch

from engine.kv_layout import KVLayout
from kvtransfer.shm import block_bytes, slab_tensors

__all__ = ["HostSlab", "block_bytes"]


class HostSlab:
    def __init__(self, layout: KVLayout, arena: torch.Tensor) -> None:
        """arena: (nbytes,) uint8; as many whole blocks as fit in it become slots."""
        self.layout = layout
        self.num_slots = arena.numel() // block_bytes(layout)
        if self.num_slots < 1:
            raise ValueError(f"an arena of {arena.numel()} bytes holds no block of {block_bytes(layout)} bytes")
        self.block_bytes = block_bytes(layout)
        # per layer (2, num_slots, block_size, kv_heads, head_dim): consecutive runs of the arena,
        # as the workers that map it cut it too
        self.tensors = slab_tensors(arena, layout, self.num_slots)
        self._returned: list[int] = []  # a heap of slots given back
        self._fresh = 0  # slots from here on were never handed out

    @property
    def num_free(self) -> int:
        return len(self._returned) + self.num_slots - self._fresh

    def take(self) -> int | None:
        if self._returned:
            return heapq.heappop(self._returned)
        if self._fresh < self.num_slots:
            self._fresh += 1
            return self._fresh - 1
        return None

    def give_back(self, slot: int) -> None:
        heapq.heappush(self._returned, slot)

    def read(self, slot: int) -> torch.Tensor:
        """A copy of one block: (num_layers, 2, block_size, kv_heads, head_dim)."""
        return torch.stack([kv[:, slot] for kv in self.tensors])

    def write(self, slot: int, block: torch.Tensor) -> None:
        """block: (num_layers, 2, block_size, kv_heads, head_dim), as read() returns it."""
        for layer, kv in enumerate(self.tensors):
            kv[:, slot].copy_(block[layer])
