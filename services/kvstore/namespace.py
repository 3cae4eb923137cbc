"""One KV layout's blocks in the store: memory, then disk, under one LRU order, with custody.

Design note. A stored block lives in exactly one tier: a slot of the memory slab, or a file of
the disk shelf. Memory holds the most recently used blocks; making room there moves the least
recently used block that nobody is reading to disk (or drops it, without a disk tier, or when the
disk cannot make room either); the disk drops its own least recently used blocks the same way.
A fetch that finds a block on disk reads it back into memory before pushing it. So recency runs
memory (newest) -> disk (oldest), one LRU order across the tiers.

Custody. Each block carries the generation it was stored under; moving between tiers keeps it,
storing the block again (after it was dropped) gives a new one. A fetch pins its blocks (readers)
after checking every generation, so nothing it reads is moved or dropped until it ends, and a
block with another generation than the lookup saw refuses the whole fetch.

Blocks being offered have slots but no entry until they land whole (`landed`); a push that fails
gives its slots back and stores nothing. Everything here runs on the store's event loop; only
file I/O leaves it (DiskShelf). The memory slab comes made (its arena allocated beforehand, off the
loop: memory.py), so nothing here allocates.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.block_pool import KVEvents
from engine.ids import BlockHash
from kvtransfer.receiver import KVCaches
from services.kvstore.disk import CorruptBlock, DiskShelf
from services.kvstore.slab import HostSlab
from services.kvstore.stats import StoreCounters
from services.status import NoCapacity, StaleBlock

_MAX_EVENTS = 65_536  # changes kept between two reports before the next one becomes a snapshot


@dataclass(slots=True, eq=False)
class Stored:
    block_hash: BlockHash
    generation: int
    slot: int | None  # its memory slot; None while it is on disk
    readers: int = 0  # fetches that pinned it
    loading: asyncio.Future[None] | None = None  # being read back from disk


@dataclass
class _EventLog:
    """Blocks stored and removed since the last take; a snapshot once too many piled up."""

    stored: list[BlockHash] = field(default_factory=list)
    removed: list[BlockHash] = field(default_factory=list)
    lost: bool = True  # the first take is a snapshot

    def record(self, events: list[BlockHash], block_hash: BlockHash) -> None:
        if not self.lost:
            events.append(block_hash)
            if len(self.stored) + len(self.removed) > _MAX_EVENTS:
                self.stored, self.removed, self.lost = [], [], True

    def take(self, snapshot: bool, held: Sequence[BlockHash]) -> KVEvents:
        if snapshot or self.lost:
            events = KVEvents(snapshot=True, stored=tuple(held))
        else:
            events = KVEvents(stored=tuple(self.stored), removed=tuple(self.removed))
        self.stored, self.removed, self.lost = [], [], False
        return events


class Namespace:
    def __init__(
        self, slab: HostSlab, disk: DiskShelf | None, new_generation: Callable[[], int], counters: StoreCounters,
    ) -> None:  # fmt: skip
        self.layout = slab.layout
        self.num_slots = slab.num_slots
        self.block_bytes = slab.block_bytes
        self.disk = disk
        self._slab = slab
        self.caches = KVCaches(slab.layout, slab.tensors)  # offers land there, fetches are packed from there
        self._new_generation = new_generation
        self.counters = counters
        self.blocks: dict[BlockHash, Stored] = {}
        self._memory: OrderedDict[BlockHash, None] = OrderedDict()  # least recently used first
        self._incoming: set[BlockHash] = set()  # offered, landing
        self._events = _EventLog()

    # ---- reading the state
    @property
    def memory_used_bytes(self) -> int:
        return (self.num_slots - self._slab.num_free) * self.block_bytes

    @property
    def num_memory_blocks(self) -> int:
        return len(self._memory)

    @property
    def num_disk_blocks(self) -> int:
        return len(self.blocks) - len(self._memory)

    def take_events(self, snapshot: bool) -> KVEvents:
        return self._events.take(snapshot, list(self.blocks))

    # ---- lookup and offer
    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Generations of the longest leading run of hashes held (memory or disk), up to what one
        fetch can read: a fetch pushes from memory, so it holds at most the memory tier."""
        found: list[int] = []
        for block_hash in hashes[: self.num_slots]:
            entry = self.blocks.get(block_hash)
            if entry is None:
                break
            found.append(entry.generation)
        return found

    def offer(self, hashes: Sequence[BlockHash]) -> tuple[list[int], list[int]]:
        """(positions wanted, their slots): the blocks not held nor landing, as long as room can be
        made. Blocks held already count as used again."""
        wanted: list[int] = []
        slots: list[int] = []
        for i, block_hash in enumerate(hashes):
            if block_hash in self.blocks or block_hash in self._incoming:
                self._touch(block_hash)
                continue
            slot = self._take_slot()
            if slot is None:
                break  # later blocks of a prefix are of no use without this one
            self._incoming.add(block_hash)
            wanted.append(i)
            slots.append(slot)
        return wanted, slots

    def landed(self, hashes: Sequence[BlockHash], slots: Sequence[int], ok: bool) -> None:
        """An offer's push ended: store its blocks (each under a new generation), or give back the slots."""
        for block_hash, slot in zip(hashes, slots, strict=True):
            self._incoming.discard(block_hash)
            if not ok:
                self._slab.give_back(slot)
                continue
            self.blocks[block_hash] = Stored(block_hash, self._new_generation(), slot)
            self._memory[block_hash] = None
            self._events.record(self._events.stored, block_hash)
            self.counters.stored_blocks += 1

    # ---- fetch: pin, load into memory, unpin
    def pin(self, hashes: Sequence[BlockHash], generations: Sequence[int]) -> list[Stored]:
        """Every block as its lookup saw it, pinned; StaleBlock (nothing pinned) otherwise."""
        entries = []
        for i, (block_hash, generation) in enumerate(zip(hashes, generations, strict=True)):
            entry = self.blocks.get(block_hash)
            if entry is None or entry.generation != generation:
                now = "is gone" if entry is None else f"has generation {entry.generation}"
                raise StaleBlock(
                    f"block_hashes[{i}]",
                    f"{block_hash:016x} {now}, not the generation {generation} looked up",
                    "look the prefix up again",
                )
            entries.append(entry)
        for entry in entries:
            entry.readers += 1
            self._touch(entry.block_hash)
        return entries

    async def load(self, entries: Sequence[Stored]) -> list[int]:
        """The memory slots of pinned blocks, reading those on disk back first."""
        for entry in entries:
            while entry.loading is not None:
                await asyncio.shield(entry.loading)
            if entry.slot is None:
                await self._promote(entry)
        return [e.slot for e in entries if e.slot is not None]

    def unpin(self, entries: Sequence[Stored]) -> None:
        for entry in entries:
            entry.readers -= 1

    async def start_fetch(
        self, hashes: Sequence[BlockHash], generations: Sequence[int]
    ) -> tuple[list[Stored], list[int]]:
        """A fetch's first half, over UCX or shared memory: the blocks as looked up, pinned, and
        their memory slots (disk read back first); the fetch counts as in flight until the caller
        unpins them and takes it out. A stale lookup (StaleBlock) counts as refused; on any
        failure nothing stays pinned or in flight."""
        try:
            entries = self.pin(hashes, generations)
        except StaleBlock:
            self.counters.fetches_refused += 1
            raise
        self.counters.fetches_in_flight += 1
        try:
            return entries, await self.load(entries)
        except BaseException as e:
            self.counters.fetches_in_flight -= 1
            self.counters.fetches_refused += isinstance(e, StaleBlock)
            self.unpin(entries)
            raise

    # ---- restore after a restart
    def restore(self, hashes: Sequence[BlockHash]) -> None:
        """Blocks a previous run left on disk, oldest first: each under a new generation."""
        for block_hash in hashes:
            self.blocks[block_hash] = Stored(block_hash, self._new_generation(), None)
        self.counters.restored_blocks += len(hashes)

    # ---- making room
    def _touch(self, block_hash: BlockHash) -> None:
        if block_hash in self._memory:
            self._memory.move_to_end(block_hash)

    def _take_slot(self) -> int | None:
        """A free memory slot, moving the least recently used unread block to disk if need be."""
        slab = self._slab
        slot = slab.take()
        if slot is not None:
            return slot
        victim = next((self.blocks[h] for h in self._memory if self.blocks[h].readers == 0), None)
        if victim is None or victim.slot is None:
            return None  # every block in memory is being read
        slot, victim.slot = victim.slot, None
        del self._memory[victim.block_hash]
        if self.disk is not None and self._disk_room():
            self.disk.put(victim.block_hash, slab.read(slot))
            self.counters.demoted_blocks += 1
        else:
            self._drop(victim)
        return slot

    def _disk_room(self) -> bool:
        assert self.disk is not None
        for block_hash in self.disk.oldest():
            if self.disk.room_for_one:
                break
            entry = self.blocks[block_hash]
            if entry.readers == 0 and entry.loading is None:
                self.disk.remove(block_hash)
                self._drop(entry)
        return self.disk.room_for_one

    def _drop(self, entry: Stored) -> None:
        del self.blocks[entry.block_hash]
        self._events.record(self._events.removed, entry.block_hash)
        self.counters.evicted_blocks += 1

    async def _promote(self, entry: Stored) -> None:
        assert self.disk is not None and entry.readers > 0
        entry.loading = asyncio.get_running_loop().create_future()
        try:
            slot = self._take_slot()
            if slot is None:
                raise NoCapacity("kv_store", "every memory slot is being read", "retry the fetch later")
            try:
                block = await self.disk.read(entry.block_hash)
            except CorruptBlock as e:  # refused, never served: the fetch fails, the block goes
                self._slab.give_back(slot)
                self.disk.remove(entry.block_hash)
                self._drop(entry)
                raise StaleBlock("block_hashes", str(e), "look the prefix up again") from None
            self._slab.write(slot, block)
            self.disk.remove(entry.block_hash)
            entry.slot = slot
            self._memory[entry.block_hash] = None
            self.counters.promoted_blocks += 1
        finally:
            entry.loading.set_result(None)
            entry.loading = None
