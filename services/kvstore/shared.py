"""Fetches and offers over shared memory: workers on the store's host copy blocks out of and into
the memory tier they mapped (kvtransfer/shm.py); the store only hands out slots, under leases.

    fetch:  check generations, pin (reading back from disk first) -> (slots, lease)
            ... the worker copies the slots into its blocks ...
            ReleaseFetch(lease) -> unpinned; "held" tells the worker its copy read what was
            looked up (a lease that ran out first was unpinned then: the worker discards its copy)
    offer:  slots for the blocks the store lacks (as for a UCX offer) -> (slots, lease)
            ... the worker writes the slots ...
            CommitOffer(lease) -> stored, each under a new generation

Nothing waits on a worker: a lease that runs out ends itself. An expired fetch lease unpins its
blocks; an expired offer gives its slots back, so a worker killed between the two calls strands
nothing beyond the lease. A slot being written has no generation (it is not stored) until the
commit, so nothing reads it half-written. The worker counts an offer's lease from before its call
and writes nothing past it; the store keeps the slots for twice as long, so a write the worker
began in time (a copy of milliseconds) never lands in a slot given to another block.

Every call names the arena the worker mapped (its id): a store restarted under the same name has
a new arena, and a worker still mapping the old one is refused (StaleBlock), to map again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from kvtransfer.shm import ArenaInfo
from services.kvstore.namespace import Namespace, Stored
from services.kvstore.store import BlockStore
from services.status import StaleBlock

log = structlog.get_logger(__name__)
MAX_LEASE_S = 120.0  # a lease asked for longer is cut to this
_OFFER_GRACE = 2.0  # an offer's slots are kept this many times its lease (the module says why)


@dataclass
class _Lease:
    namespace: Namespace
    timer: asyncio.TimerHandle
    entries: Sequence[Stored] = ()  # a fetch's pinned blocks
    hashes: Sequence[BlockHash] = ()  # an offer's blocks
    slots: Sequence[int] = ()  # an offer's slots


@dataclass(frozen=True)
class SharedFetch:
    slots: list[int]
    lease_id: str


@dataclass(frozen=True)
class SharedOffer:
    wanted: list[int]  # positions of the offered hashes the store wants
    slots: list[int]  # the slot each wanted block is written to
    lease_id: str  # "" when nothing is wanted


class SharedTransfers:
    def __init__(self, store: BlockStore) -> None:
        self.store = store
        self._fetches: dict[str, _Lease] = {}
        self._offers: dict[str, _Lease] = {}

    def map(self, layout: KVLayout) -> ArenaInfo | None:
        """The layout's arena, its namespace created if need be (as a first offer does); None when
        it is private memory, or still being allocated."""
        self.store.namespace(layout, create=True)
        return self.store.shared(layout)

    async def fetch(
        self, layout: KVLayout, hashes: Sequence[BlockHash], generations: Sequence[int], arena_id: int, lease_s: float
    ) -> SharedFetch:
        namespace = self._namespace(layout, arena_id)
        entries, slots = await namespace.start_fetch(hashes, generations)
        lease_id = f"fetch-{uuid.uuid4().hex[:16]}"
        timer = asyncio.get_running_loop().call_later(min(lease_s, MAX_LEASE_S), self._expired, lease_id)
        self._fetches[lease_id] = _Lease(namespace, timer, entries=entries)
        self.store.counters.leases += 1
        return SharedFetch(slots, lease_id)

    def release(self, lease_id: str) -> bool:
        """Unpin a fetch's blocks; whether its lease still held them (False: it ran out first)."""
        return self._fetch_ended(lease_id, True)

    def offer(self, layout: KVLayout, hashes: Sequence[BlockHash], arena_id: int, lease_s: float) -> SharedOffer:
        self.store.counters.offers += 1
        namespace = self._namespace(layout, arena_id)
        wanted, slots = namespace.offer(hashes)
        if not wanted:
            return SharedOffer([], [], "")
        lease_id = f"offer-{uuid.uuid4().hex[:16]}"
        keep_s = min(lease_s, MAX_LEASE_S) * _OFFER_GRACE
        timer = asyncio.get_running_loop().call_later(keep_s, self._expired, lease_id)
        self._offers[lease_id] = _Lease(namespace, timer, hashes=[hashes[i] for i in wanted], slots=slots)
        self.store.counters.leases += 1
        return SharedOffer(wanted, slots, lease_id)

    def commit(self, lease_id: str, written: bool) -> bool:
        """Store an offer's blocks (`written`: the worker wrote every slot) or give its slots back;
        whether they were stored (False also when the lease had ended)."""
        return self._offer_ended(lease_id, written)

    def close(self) -> None:
        for lease_id in list(self._fetches):
            self._fetch_ended(lease_id, False)
        for lease_id in list(self._offers):
            self._offer_ended(lease_id, False)

    def _namespace(self, layout: KVLayout, arena_id: int) -> Namespace:
        namespace, info = self.store.namespace(layout), self.store.shared(layout)
        if namespace is None or info is None:
            raise StaleBlock("kv_layout", "the store shares no memory for this KV layout", "map its memory again")
        if info.arena_id != arena_id:
            raise StaleBlock("arena_id", f"is {arena_id:x}, not the store's arena {info.arena_id:x}",
                             "map the store's memory again (it restarted)")  # fmt: skip
        return namespace

    def _fetch_ended(self, lease_id: str, released: bool) -> bool:
        lease = self._fetches.pop(lease_id, None)
        if lease is None:
            return False
        lease.timer.cancel()
        lease.namespace.unpin(lease.entries)
        counters = self.store.counters
        counters.leases -= 1
        counters.fetches_in_flight -= 1
        if released:
            counters.fetches += 1
            counters.fetched_blocks += len(lease.entries)
        else:
            counters.fetches_failed += 1
        return True

    def _offer_ended(self, lease_id: str, written: bool) -> bool:
        lease = self._offers.pop(lease_id, None)
        if lease is None:
            return False
        lease.timer.cancel()
        self.store.counters.leases -= 1
        lease.namespace.landed(lease.hashes, lease.slots, ok=written)
        return written

    def _expired(self, lease_id: str) -> None:
        """A lease ran out (the worker died, stalled, or forgot): its pins or slots go back."""
        self.store.counters.leases_expired += 1
        log.info("shared memory lease ran out", lease=lease_id)
        if lease_id in self._fetches:
            self._fetch_ended(lease_id, False)
        else:
            self._offer_ended(lease_id, False)
