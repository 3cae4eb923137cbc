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

Shared. An arena is a file of /dev/shm (kvtransfer/shm.py), named by the store and the arena's
number, so that workers on the store's host map it and move blocks by copying instead of through
UCX; pinned, when a GPU is present, by registering the mapping with CUDA (cudaHostRegister)
instead of pin_memory. A file of the same name at start is a killed run's: removed; the files are
removed at close. Where /dev/shm lacks room (a container's default is 64 MiB) the arena is
private memory, as before, and every worker uses UCX.
"""

from __future__ import annotations

import concurrent.futures
import re
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from kvtransfer import shm

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Arena:
    tensor: torch.Tensor  # (nbytes,) uint8
    path: Path | None = None  # the /dev/shm file it maps; None: private memory, UCX only
    arena_id: int = 0  # written in the file's header (kvtransfer/shm.py)
    registered: bool = False  # with CUDA (cudaHostRegister)


def allocate_arena(nbytes: int, pin: bool, path: Path | None = None) -> Arena:
    """(nbytes,) uint8 of host memory, a file at `path` (mapped shared) when given and there is
    room for it, page-locked when `pin`: slow (seconds per GiB pinned). Memory the driver refuses
    to lock is taken unpinned: the store works, its copies are slower. torch's pinned allocator
    rounds a request up to a power of two (by default), so a private memory tier of 12 GiB locks
    16: sizes of a power of two waste nothing."""
    if path is not None:
        try:
            tensor, arena_id = shm.create_arena(path, nbytes)
        except (OSError, RuntimeError) as e:
            log.warning("kv store memory not shared: workers on this host use UCX", path=str(path), error=str(e))
        else:
            return Arena(tensor, path, arena_id, registered=pin and shm.register(tensor))
    if pin:
        try:
            return Arena(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
        except RuntimeError as e:
            log.warning("kv store memory could not be pinned; unpinned instead", bytes=nbytes, error=str(e))
    return Arena(torch.empty(nbytes, dtype=torch.uint8))


def release_arena(arena: Arena) -> None:
    """Unregister the arena and remove its file (the mapping itself goes with the last tensor)."""
    if arena.registered:
        shm.unregister(arena.tensor)
    if arena.path is not None:
        arena.path.unlink(missing_ok=True)


class HostMemory:
    """Arenas of `arena_bytes`, at most `limit` of them; allocated on a thread of their own, each
    a file `<shm_dir>/pdmesh-<name>-<n>` when `shm_dir` is given."""

    def __init__(self, arena_bytes: int, pin: bool, limit: int, shm_dir: Path | None = None, name: str = "") -> None:
        self.arena_bytes = arena_bytes
        self.pin = pin
        self.limit = limit
        self.given = 0  # arenas handed to namespaces
        self._prefix = f"pdmesh-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-"
        self._shm_dir = shm_dir
        self._arenas: list[Arena] = []  # every one allocated, for close()
        self._spare: concurrent.futures.Future[Arena] | None = None  # allocated or allocating
        self._threads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-memory")
        if shm_dir is not None:  # a killed run's files: nothing maps them any more that matters
            for stale in shm_dir.glob(f"{self._prefix}*"):
                stale.unlink(missing_ok=True)

    def allocate(self) -> concurrent.futures.Future[Arena]:
        """Start allocating the spare arena (once; a second call gets the same future)."""
        if self._spare is None:
            path = self._shm_dir / f"{self._prefix}{self.given}" if self._shm_dir is not None else None
            log.info("allocating kv store memory", bytes=self.arena_bytes, pinned=self.pin, path=str(path))
            self._spare = self._threads.submit(self._allocate, path)
        return self._spare

    def _allocate(self, path: Path | None) -> Arena:
        arena = allocate_arena(self.arena_bytes, self.pin, path)
        self._arenas.append(arena)
        return arena

    @property
    def shared(self) -> bool:
        """Whether the arenas are files workers of this host can map (else private memory)."""
        return any(a.path is not None for a in list(self._arenas))

    @property
    def ready(self) -> bool:
        """Whether a namespace can be given memory now (the spare arena is allocated)."""
        return self._spare is not None and self._spare.done() and self._spare.exception() is None

    def take(self) -> Arena | None:
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

    def take_now(self) -> Arena:
        """An arena, waiting for its allocation (start-up only, on a thread: restoring from disk)."""
        self.allocate().result()
        return self._hand_out()

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        for arena in self._arenas:
            release_arena(arena)
        self._arenas.clear()

    def _hand_out(self) -> Arena:
        assert self._spare is not None
        arena = self._spare.result()
        self._spare = None
        self.given += 1
        return arena
