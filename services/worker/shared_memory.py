"""A worker's mapping of its KV store's memory tier, when they share a host (kvtransfer/shm.py).

The store is asked once where its memory is (MapMemory); a worker of the same boot id maps the
file, checks the arena id in its header and, on a GPU, registers the mapping with CUDA (seconds
per GiB: on a thread, while fetches and offers keep using UCX), mapped into the device's address
space so that an offer is one kernel launch (kvtransfer/slab_writer.py). From then on the fetcher
and the offerer copy through it. Everything else keeps UCX: another host (boot id), a file this worker
cannot see (another container's /dev/shm) or map, a store whose memory is private. A store that
answered "not shared" or "another host" is asked again only when the scheduler names another
store; one whose namespace was not ready yet, or that failed to answer, after a while. A call
refused for naming an old arena (the store restarted under the same name) drops the mapping,
and the next use maps the new one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from engine.kv_layout import KVLayout
from kernels._triton import triton_available
from kvtransfer import shm
from kvtransfer.slab_writer import SlabWriter, device_arena
from pdmesh.config import COPY_SETTLE_S
from services.worker.store_client import StoreClient, StoreUnavailable

log = structlog.get_logger(__name__)
_RETRY_S = 5.0  # before asking a store whose namespace was not ready (or that failed) again
# How long a cancelled fetch's or offer's copies may take to end before its mapping is released:
# an engine command waits one step, its copies a few milliseconds; past COPY_SETTLE_S the engine is
# taken as stuck, and the mapping stays (never unregistered or unmapped under a copy). A stopping
# worker waits for these: COPY_SETTLE_S is a share of its stop margin, so it is not killed meanwhile.


@dataclass(eq=False)
class MappedArena:
    info: shm.ArenaInfo
    arena: torch.Tensor
    slabs: list[torch.Tensor]  # per layer (2, num_slots, block_size, kv_heads, head_dim)
    registered: bool
    writer: SlabWriter | None = None  # offers in one kernel launch: the device addresses the mapping
    users: int = 0  # fetches and offers copying through it now
    retired: bool = False  # dropped: unregistered once its last user is done

    def retire_if_unused(self) -> None:
        if self.retired and self.users == 0 and self.registered:
            self.registered, self.writer = False, None
            shm.unregister(self.arena)  # no copy is queued on it: its users waited for theirs


def needs_remap(error: Exception) -> bool:
    """Whether a refusal of a shared call means the mapping is not the store's arena any more."""
    return "arena_id" in str(error) or "shares no memory" in str(error)


class SharedMemoryLink:
    def __init__(self, store: StoreClient, kv_caches: list[torch.Tensor]) -> None:
        self.store = store
        self.kv_caches = kv_caches  # the engine's: on a GPU the mapping is registered, and a writer planned for them
        self._mapped: MappedArena | None = None
        self._address = ""  # the store _mapped (or the answer below) is for
        self._retry_at = 0.0  # inf: the store said its memory is not for this worker
        self._mapping: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()  # release_after's waits

    @property
    def gave_up(self) -> bool:
        """The store said its memory is not for this worker (another host, not visible here)."""
        return self._retry_at == float("inf")

    def _current(self) -> MappedArena | None:
        """The current store's mapped memory; None (UCX) while it is not mapped, mapping begun if
        it is worth trying."""
        if self.store.address != self._address:
            self.forget()
            self._address, self._retry_at = self.store.address, 0.0
        if self._mapped is not None or not self._address or not self.store.available:
            return self._mapped
        if self._mapping is None and time.monotonic() >= self._retry_at:
            self._mapping = asyncio.get_running_loop().create_task(self._map(self._address))
        return None

    def prepare(self) -> None:
        """Begin mapping the current store's memory now (the scheduler named it), so a worker's
        first fetch need not go over UCX while it maps. Call on the event loop."""
        self._current()

    def acquire(self) -> MappedArena | None:
        """The current store's mapped memory for one fetch or offer (release() it after), or None.
        A mapping of another arena than the store's last lookup named (it restarted) is dropped."""
        if self._mapped is not None and self.store.arena_id not in (0, self._mapped.info.arena_id):
            self.forget()
        mapped = self._current()
        if mapped is not None:
            mapped.users += 1
        return mapped

    def release(self, mapped: MappedArena) -> None:
        mapped.users -= 1
        mapped.retire_if_unused()

    def release_after(
        self, mapped: MappedArena, command: concurrent.futures.Future[Any], settle: Callable[[Any], None]
    ) -> None:
        """release(mapped) once the engine command that copies through it has run (or was dropped
        before it ran) and settle(its result) has returned (its queued copies are done): what a
        fetch or an offer cancelled mid-copy does, since the engine still runs or has queued the
        copy, and releasing at once could unregister and unmap the memory under it. A thread
        waits; the event loop does not. close() waits for these."""
        task = asyncio.get_running_loop().create_task(self._release_after(mapped, command, settle))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _release_after(
        self, mapped: MappedArena, command: concurrent.futures.Future[Any], settle: Callable[[Any], None]
    ) -> None:
        settled = await asyncio.to_thread(_settle, command, settle, COPY_SETTLE_S)
        if settled:
            self.release(mapped)
        else:  # the copy may still run: the mapping stays, as if a user held it for good
            log.warning("a cancelled copy through the kv store's memory did not end in time; the mapping stays",
                        path=mapped.info.path, waited_s=COPY_SETTLE_S)  # fmt: skip

    def forget(self) -> None:
        """Drop the mapping (the store restarted, or another store is named); copies under way
        through it finish first."""
        mapped, self._mapped = self._mapped, None
        self.store.arena_id = 0  # what the last lookup said is about the arena dropped: unknown now
        if mapped is not None:
            log.info("kv store memory unmapped", path=mapped.info.path)
            mapped.retired = True
            mapped.retire_if_unused()
        self._retry_at = 0.0

    async def close(self) -> None:
        if self._mapping is not None:
            self._mapping.cancel()
            await asyncio.gather(self._mapping, return_exceptions=True)
        self.forget()
        await asyncio.gather(*self._settling, return_exceptions=True)  # the last one unregisters

    async def _map(self, address: str) -> None:
        try:
            mapped = await self._try_map()
        except (StoreUnavailable, OSError, RuntimeError) as e:
            log.info("kv store memory not mapped; using UCX", reason=str(e))
            mapped, self._retry_at = None, time.monotonic() + _RETRY_S
        finally:
            self._mapping = None
        if mapped is not None and address == self.store.address == self._address:
            self._mapped = mapped
            log.info("kv store memory mapped", path=mapped.info.path, bytes=mapped.info.arena_bytes,
                     registered=mapped.registered)  # fmt: skip
        elif mapped is not None:  # the store changed meanwhile
            mapped.retired = True
            mapped.retire_if_unused()

    async def _try_map(self) -> MappedArena | None:
        info = await self.store.map_memory()
        if info is None:
            self._retry_at = time.monotonic() + _RETRY_S  # not shared, or its memory not ready yet
            return None
        if info.boot_id != shm.boot_id() or not info.boot_id:
            self._retry_at = float("inf")
            log.info("kv store on another host; using UCX", store=self.store.address)
            return None
        arena = await asyncio.to_thread(shm.open_arena, info)
        if arena is None:
            self._retry_at = float("inf")  # another container's /dev/shm, or not this store's file
            log.info("kv store memory not visible here; using UCX", path=info.path)
            return None
        slabs = shm.slab_tensors(arena, self.store.layout, info.num_slots)
        if self.kv_caches[0].device.type != "cuda":
            return MappedArena(info, arena, slabs, registered=False)
        layout, caches = self.store.layout, self.kv_caches
        registered, writer = await asyncio.to_thread(_register, arena, layout, info.num_slots, caches)
        return MappedArena(info, arena, slabs, registered, writer)


def _register(
    arena: torch.Tensor, layout: KVLayout, num_slots: int, kv_caches: list[torch.Tensor]
) -> tuple[bool, SlabWriter | None]:
    """(registered, a writer for offers where the device can address the mapping and Triton can
    launch the copy). On a thread: registering takes seconds per GiB, asking for the device address
    wants the CUDA context the registration made current on this thread, and the writer's kernel
    is compiled here rather than on the step thread at the first offer."""
    device = kv_caches[0].device
    if not shm.register(arena, device):
        return False, None
    view = device_arena(arena, device) if triton_available() else None
    if view is None:
        return True, None
    writer = SlabWriter(shm.slab_tensors(view, layout, num_slots))
    try:
        writer.prepare(kv_caches)
    except Exception as e:  # planning or Triton refused: offers keep torch's copies
        log.warning("offers into shared kv memory keep torch copies", error=f"{type(e).__name__}: {e}")
        return True, None
    return True, writer


def _settle(command: concurrent.futures.Future[Any], settle: Callable[[Any], None], timeout_s: float) -> bool:
    """On a thread: whether the command ended (ran, failed or was dropped) and settle(its result)
    returned, within timeout_s. A command that failed has no result to settle; settle gets None."""
    try:
        result = command.result(timeout_s)
    except concurrent.futures.TimeoutError:
        return False
    except BaseException:  # failed or dropped (cancelled before it ran: nothing was queued)
        if command.cancelled():
            return True
        result = None
    settle(result)
    return True
