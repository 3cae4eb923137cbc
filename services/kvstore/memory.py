"""The store's host memory: one arena of `memory_bytes` per KV layout namespace, allocated before
it is needed and never on the event loop.

Why. Pinned host memory (a GPU is present) is page-locked when allocated: for the 8 GiB a GPU
store holds that takes seconds (cudaHostAlloc faults and locks every page). Allocated at the first
offer, on the loop, it stalled every call for that long, and each worker's first offer missed its
deadline (seen on an H200: no block ever landed). So the first arena is allocated at start-up, on
a thread, while the store's health says NOT_SERVING; a namespace is then a view of it, laid out
for its KV layout (slab.HostSlab), and costs nothing to create. A further layout's arena (a second
model) is allocated on a thread when its first offer comes; until it is there, offers of that
layout are answered "nothing wanted" at once.

Unpinned (no GPU), an arena is virtual memory the kernel backs page by page as blocks land, so
an idle store's resident size stays small.
"""

from __future__ import annotations

import concurrent.futures

import structlog
import torch

log = structlog.get_logger(__name__)


def allocate_arena(nbytes: int, pin: bool) -> torch.Tensor:
    """(nbytes,) uint8 of host memory, page-locked when `pin`: slow (seconds per GiB pinned).
    Memory the driver refuses to lock is taken unpinned: the store works, its copies are slower.
    torch's pinned allocator rounds a request up to a power of two (by default), so a memory tier
    of 12 GiB locks 16: sizes of a power of two waste nothing."""
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as e:
            log.warning("kv store memory could not be pinned; unpinned instead", bytes=nbytes, error=str(e))
    return torch.empty(nbytes, dtype=torch.uint8)


class HostMemory:
    """Arenas of `arena_bytes`, at most `limit` of them; allocated on a thread of their own."""

    def __init__(self, arena_bytes: int, pin: bool, limit: int) -> None:
        self.arena_bytes = arena_bytes
        self.pin = pin
        self.limit = limit
        self.given = 0  # arenas handed to namespaces
        self._spare: concurrent.futures.Future[torch.Tensor] | None = None  # allocated or allocating
        self._threads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-memory")

    def allocate(self) -> concurrent.futures.Future[torch.Tensor]:
        """Start allocating the spare arena (once; a second call gets the same future)."""
        if self._spare is None:
            log.info("allocating kv store memory", bytes=self.arena_bytes, pinned=self.pin)
            self._spare = self._threads.submit(allocate_arena, self.arena_bytes, self.pin)
        return self._spare

    @property
    def ready(self) -> bool:
        """Whether a namespace can be given memory now (the spare arena is allocated)."""
        return self._spare is not None and self._spare.done() and self._spare.exception() is None

    def take(self) -> torch.Tensor | None:
        """The spare arena if it is allocated; else None, its allocation under way (unless every
        arena is given). Never blocks: it runs on the event loop."""
        if self.ready:
            return self._hand_out()
        if self._spare is not None and self._spare.done():  # the allocation failed: try again
            log.warning("kv store memory allocation failed", error=str(self._spare.exception()))
            self._spare = None
        if self.given < self.limit:
            self.allocate()
        return None

    def take_now(self) -> torch.Tensor:
        """An arena, waiting for its allocation (start-up only, on a thread: restoring from disk)."""
        self.allocate().result()
        return self._hand_out()

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)

    def _hand_out(self) -> torch.Tensor:
        assert self._spare is not None
        arena = self._spare.result()
        self._spare = None
        self.given += 1
        return arena
