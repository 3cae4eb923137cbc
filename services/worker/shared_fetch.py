"""A prefix fetch through the store's memory mapped on this host (shared_memory.py), instead of a
UCX push into a ticket:

    store.Fetch(shared) -> the blocks pinned, their slots, a lease
    engine thread, between steps: Engine.import_blocks copies the slots into the reserved blocks
    (on CUDA queued on the engine's stream; this waits for its event, off the event loop)
    store.ReleaseFetch -> "held": the blocks stayed pinned throughout, the copy is what was
    looked up -> the import is done; otherwise it failed and the engine computes those tokens

The import (SharedImport) is the engine's KVImport: a request waits for it and, if it fails,
computes the tokens itself, losing only the time to notice (every call is timed by the fetch's
timeout). A request that ends first cancels it; the copy then never starts (the check runs on
the engine's thread, where the cancel does), and the lease is released. However the fetch ends
(done, failed, cancelled before it began or mid-copy) it gives its use of the mapping back once.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass

import structlog
import torch

from engine.async_engine import AsyncEngine
from engine.ids import BlockHash
from services.worker.fetch_policy import FetchPolicy
from services.worker.shared_memory import MappedArena, SharedMemoryLink, needs_remap
from services.worker.store_client import StaleLookup, StoreClient, StoreUnavailable

log = structlog.get_logger(__name__)


class SharedImport:
    """engine.handoff.KVImport of a shared-memory fetch."""

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None
        self.cancelled = False  # set on the engine's thread

    def done(self) -> bool:
        return self._done

    def error(self) -> BaseException | None:
        return self._error

    def cancel(self, reason: str) -> None:
        self.cancelled = True

    def finish(self) -> None:
        if self._error is None:
            self._done = True

    def fail(self, error: BaseException) -> None:
        if not self._done and self._error is None:
            self._error = error


@dataclass
class _Copy:
    """A fetch's engine command that copies from the mapping, and whether its copies are done."""

    command: Future[tuple[bool, torch.cuda.Event | None]] | None = None
    settled: bool = False


def _wait_copied(result: tuple[bool, torch.cuda.Event | None] | None, device: torch.device) -> None:
    """On a thread: until an import's copies are done (an import that failed part-way: the device's)."""
    if result is not None:
        if result[1] is not None:
            result[1].synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


class SharedFetcher:
    def __init__(self, engine: AsyncEngine, store: StoreClient, link: SharedMemoryLink, policy: FetchPolicy) -> None:
        self.engine = engine
        self.store = store
        self.link = link
        self.policy = policy

    def start(
        self, request_id: str, imported: SharedImport, mapped: MappedArena, block_ids: list[int],
        hashes: list[BlockHash], generations: list[int], route: str, timeout_s: float,
    ) -> asyncio.Task[None]:  # fmt: skip
        """fetch() as a task, which owns `mapped` from now on. A task cancelled before its first step
        (the worker stopping) never enters fetch(), whose end releases it: its own end does then."""
        began = False

        async def run() -> None:
            nonlocal began
            began = True  # and fetch() is entered with no await between: its end releases `mapped`
            await self.fetch(request_id, imported, mapped, block_ids, hashes, generations, route, timeout_s)

        def ended(_: asyncio.Task[None]) -> None:
            if not began:
                imported.fail(StoreUnavailable("the fetch was cancelled before it began"))
                self.link.release(mapped)

        task = asyncio.get_running_loop().create_task(run())
        task.add_done_callback(ended)
        return task

    async def fetch(
        self, request_id: str, imported: SharedImport, mapped: MappedArena, block_ids: list[int],
        hashes: list[BlockHash], generations: list[int], route: str, timeout_s: float,
    ) -> None:  # fmt: skip
        """Fill the import's blocks (start() runs it as a task). Releases `mapped` at the end, and
        only once no copy from it can still run: a cancelled fetch's import may still be running on
        the engine's thread, or its copies be queued on the device, after the cancel."""
        started = time.monotonic()
        copy = _Copy()
        try:
            landed = await self._fetch(request_id, imported, mapped, block_ids, hashes, generations, timeout_s, copy)
        except StaleLookup as e:  # answered at once: no measure of speed
            if needs_remap(e):
                self.link.forget()
            imported.fail(e)
            log.info("kv store fetch refused; computing the prefix", request_id=request_id, reason=str(e))
            return
        except asyncio.CancelledError:  # the worker is stopping
            imported.fail(StoreUnavailable("the fetch was cancelled"))
            raise
        except Exception as e:  # whatever failed, the request computes those tokens, never waits
            imported.fail(e)
            log.info("kv store fetch failed; computing the prefix", request_id=request_id, reason=str(e))
            landed = False
        finally:
            if copy.command is None or copy.settled:
                self.link.release(mapped)
            else:
                device = self.engine.engine.device
                self.link.release_after(mapped, copy.command, lambda result: _wait_copied(result, device))
        self.policy.fetch_took(route, len(hashes), (time.monotonic() - started) * 1000, landed=landed)

    async def _fetch(
        self, request_id: str, imported: SharedImport, mapped: MappedArena, block_ids: list[int],
        hashes: list[BlockHash], generations: list[int], timeout_s: float, copy: _Copy,
    ) -> bool:  # fmt: skip
        slots, lease_id = await self.store.fetch_shared(hashes, generations, mapped.info.arena_id, timeout_s)
        try:
            slabs = mapped.slabs
            copy.command = self.engine.submit(
                lambda e: (False, None) if imported.cancelled else e.import_blocks(request_id, block_ids, slabs, slots)
            )
            copied, event = await asyncio.wrap_future(copy.command)  # a cancel drops it if it has not begun
            if event is not None:
                await asyncio.to_thread(event.synchronize)
            copy.settled = True
        finally:  # shielded: a cancelled fetch still unpins at once, not at its lease's end
            held = await asyncio.shield(self._release(lease_id, len(hashes)))
        if not copied:
            imported.fail(StoreUnavailable("the request ended before its prefix was copied"))
            return False
        if not held:
            imported.fail(StoreUnavailable("the store's lease ran out during the copy"))
            return False
        imported.finish()
        return True

    async def _release(self, lease_id: str, num_blocks: int) -> bool:
        try:
            return await self.store.release_fetch(lease_id, num_blocks)
        except StoreUnavailable as e:
            log.info("kv store release failed; the lease ends on its own", lease=lease_id, reason=str(e))
            return False
