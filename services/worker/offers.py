"""After prefill: the worker's newly computed full blocks go to the KV store, in the background.

A loop takes the hash chains of the requests the engine finished since its last look
(Engine.take_finished_chains) and offers each chain to the store, a bounded run of blocks at a
time; the store answers with the blocks it lacks and a ticket, and the engine pushes those out of
its prefix cache between two steps (Engine.export_blocks), while they are still cached. A run is
bounded in bytes, not blocks: a GPU model's block is megabytes (Llama-3.1-8B's, bf16: 2 MiB), a
small CPU model's about one, and the pack between two steps should cost about the same. Nothing
here is on the way to any request's first token: a request is finished before its blocks are
offered, an offer that fails is dropped (the blocks are only a cache), and when the store is
slow or away new chains beyond the backlog's byte bound are dropped, and counted
(StoreCounters.offer_dropped_blocks): offers never queue without bound on a worker.

Offers also yield to hand-offs: a run starts only once no other ticket is in flight on the
worker's transport (a prefill's push, a decode worker's incoming hand-off, a store fetch), or after
waiting _YIELD_MAX_S, and runs are small. Offers share the transport's thread with the hand-offs,
and on one H200 a hand-off that landed on a decode worker while it was offering its earlier 4k
prompts (512 MiB each, over tcp in 64 MiB runs) had 236 ms of its push exposed, against 1-6 ms
without offers (BENCHMARKS.md, "Where a 4k prompt's TTFT goes").

On the store's host (shared_memory.py) an offer writes the wanted blocks straight into the
store's mapped memory: the store answers their slots under a lease, Engine.export_blocks copies
into them through a kvtransfer.shm.SlabSink (nothing written past the lease), and CommitOffer
stores them, or gives the slots back when the copy did not complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import Future

import structlog

from engine.async_engine import AsyncEngine
from engine.ids import BlockHash
from kvtransfer.errors import TransferFailed
from kvtransfer.shm import SlabSink
from kvtransfer.transport import KVTransport
from services.worker.shared_memory import MappedArena, SharedMemoryLink, needs_remap
from services.worker.store_client import StaleLookup, StoreClient, StoreUnavailable

log = structlog.get_logger(__name__)
_INTERVAL_S = 0.05  # how often the loop looks for finished requests
# One offer's run of blocks: bounds the pack done between two steps, and how long a hand-off that
# arrives during a run shares the transport with it (16 MiB: ~25 ms at the store's ~0.6 GB/s).
_BYTES_PER_OFFER = 16 << 20
_PUSH_TIMEOUT_S = 30.0  # also a shared offer's lease: the copy is milliseconds, the engine's step may not be
_YIELD_POLL_S = 0.005  # how often a waiting offer looks whether the hand-offs are done
_YIELD_MAX_S = 2.0  # then it goes anyway: under constant load offers still trickle, the backlog bounds them


class Offerer:
    """Two loops: one takes the engine's finished chains into a backlog bounded in bytes (what does
    not fit is dropped and counted: a store that cannot keep up costs the worker nothing), the
    other offers the backlog's chains one at a time, oldest first."""

    def __init__(
        self, engine: AsyncEngine, transport: KVTransport, store: StoreClient, backlog_bytes: int,
        link: SharedMemoryLink | None = None,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.link = link
        self.transport = transport
        self.store = store
        self.pushed_blocks = 0  # blocks this worker has put in the store
        block_bytes = store.layout.bytes_per_token * store.layout.block_size
        self.blocks_per_offer = max(1, _BYTES_PER_OFFER // block_bytes)
        self.backlog_capacity_blocks = max(1, backlog_bytes // block_bytes)
        self._backlog: deque[tuple[BlockHash, ...]] = deque()
        self.backlog_blocks = 0  # blocks in the backlog's chains (a prefix shared by two counts twice)
        self._queued = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._take(), name="kvstore-offer-take"),
                       loop.create_task(self._drain(), name="kvstore-offers")]  # fmt: skip

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def enqueue(self, chains: list[tuple[BlockHash, ...]]) -> None:
        """Queue chains to offer, longest first, as much of each as the backlog has room for: a
        chain cut short keeps its prefix (what a later prompt can reuse)."""
        for chain in _longest_first(chains):
            room = self.backlog_capacity_blocks - self.backlog_blocks if self.store.available else 0
            kept = chain[: max(0, room)]
            self.store.counters.offer_dropped_blocks += len(chain) - len(kept)
            if kept:
                self._backlog.append(kept)
                self.backlog_blocks += len(kept)
                self._queued.set()

    async def _take(self) -> None:
        while True:
            await asyncio.sleep(_INTERVAL_S)
            self.enqueue(await self.engine.call(lambda e: e.take_finished_chains()))

    async def _drain(self) -> None:
        while True:
            await self._queued.wait()
            while self._backlog:
                chain = self._backlog[0]
                if self.store.available:
                    await self.offer(chain)
                else:  # set aside: dropped, later chains will be offered
                    self.store.counters.offer_dropped_blocks += len(chain)
                self._backlog.popleft()
                self.backlog_blocks -= len(chain)
            self._queued.clear()

    async def offer(self, chain: tuple[BlockHash, ...]) -> int:
        """Offer one chain, a run of blocks at a time; returns the blocks pushed."""
        pushed = 0
        for start in range(0, len(chain), self.blocks_per_offer):
            try:
                pushed += await self._offer_run(chain[start : start + self.blocks_per_offer])
            except (StoreUnavailable, TransferFailed, TimeoutError) as e:
                log.info("offer to the kv store dropped", blocks=len(chain), reason=str(e))
                break
        self.pushed_blocks += pushed
        return pushed

    async def _yield_to_handoffs(self) -> None:
        """Until no other ticket is in flight on the transport (at most _YIELD_MAX_S): a hand-off
        or a fetch is on some request's way to its first token, an offer on nobody's."""
        waited = 0.0
        while self.transport.num_in_flight > 0 and waited < _YIELD_MAX_S:
            await asyncio.sleep(_YIELD_POLL_S)
            waited += _YIELD_POLL_S

    async def _offer_run(self, hashes: tuple[BlockHash, ...]) -> int:
        await self._yield_to_handoffs()
        mapped = self.link.acquire() if self.link is not None else None
        if mapped is not None and self.link is not None:
            try:
                return await self._offer_shared(hashes, mapped, self.link)
            except StaleLookup as e:
                if not needs_remap(e):
                    raise
                self.link.forget()  # the store restarted: this run over UCX, the next ones mapped again
        offered = await self.store.offer(hashes)
        if offered.ticket is None or not offered.wanted:
            return 0
        wanted = [hashes[i] for i in offered.wanted]
        push = self.transport.push(offered.ticket)
        exported = await self.engine.call(lambda e: e.export_blocks(wanted, push))
        if exported:
            await asyncio.wait_for(asyncio.wrap_future(push.future), _PUSH_TIMEOUT_S)
            self.store.counters.offered_blocks += exported
        return exported

    async def _offer_shared(self, hashes: tuple[BlockHash, ...], mapped: MappedArena, link: SharedMemoryLink) -> int:
        """Offer a run through the store's mapped memory. Releases `mapped`, and only once no copy
        into it can still run: a cancelled offer's export may still be running on the engine's
        thread, or its copies be queued on the device, after the cancel."""
        deadline = time.monotonic() + _PUSH_TIMEOUT_S  # counted from before the call: the store's starts later
        export: Future[int] | None = None
        settled = False  # the export ran and its copies are done
        try:
            offered = await self.store.offer_shared(hashes, mapped.info.arena_id, _PUSH_TIMEOUT_S)
            if not offered.wanted:
                return 0
            sink = SlabSink(mapped.slabs, offered.slots, deadline, mapped.writer)
            wanted = [hashes[i] for i in offered.wanted]
            export = self.engine.submit(lambda e: e.export_blocks(wanted, sink))
            try:
                exported = await asyncio.wrap_future(export)  # a cancel drops it if it has not begun
                await asyncio.to_thread(sink.wait)
                settled = True
            except asyncio.CancelledError:  # the slots go back at the lease's end
                sink.cancel("the offer was cancelled")  # nothing more is queued
                raise
            except BaseException:
                with contextlib.suppress(Exception):  # the copies end before the slots go back
                    await asyncio.to_thread(sink.wait)
                await self.store.commit_offer(offered.lease_id, written=False)
                raise
        finally:
            if export is None or settled:
                link.release(mapped)
            else:
                link.release_after(mapped, export, lambda _: sink.wait())
        written = sink.landed() and time.monotonic() < deadline
        if not await self.store.commit_offer(offered.lease_id, written) or not written:
            return 0
        self.store.counters.offered_blocks += exported
        return exported


def _longest_first(chains: list[tuple[BlockHash, ...]]) -> list[tuple[BlockHash, ...]]:
    """Each chain once, those that extend another's prefix standing for it: a multi-turn
    conversation's later turn covers the earlier ones."""
    kept: list[tuple[BlockHash, ...]] = []
    for chain in sorted(chains, key=len, reverse=True):
        if not any(k[: len(chain)] == chain for k in kept):
            kept.append(chain)
    return kept
