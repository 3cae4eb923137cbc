"""The block pool: which KV blocks are free, who holds the rest, and which hold a cached prefix.

Design note. Every block is in exactly one of three states:
  * held   — ref_count > 0: one or more requests (or a reservation) use it; never evicted;
  * cached — ref_count == 0 but it still carries a full block's hash, so a later request with the
             same prefix can take it back without recomputing;
  * free   — ref_count == 0 and no hash.
Cached and free blocks wait together in one LRU queue. Allocation takes from the queue's head
(least recently freed), evicting the hash of a cached block it takes. A request's blocks are
released tail first, so when memory runs short the ends of old prompts go before their shared
beginnings. The pool knows blocks, counts and hashes — not requests, tokens or tensors.

It also keeps the changes to its set of cached hashes (KVEvents) for a worker to report to the
scheduler, which places requests where their prefix is cached. The record is bounded: past
_MAX_EVENTS_PER_BLOCK events per block untaken it is dropped, and the next take is a snapshot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.errors import OutOfBlocks
from engine.ids import BlockHash, BlockId

_MAX_EVENTS_PER_BLOCK = 4


@dataclass(frozen=True)
class KVEvents:
    """Prefix-cache changes since the last take: hashes that became reusable and hashes evicted;
    or, when `snapshot`, every hash cached now (the reader replaces what it knew)."""

    snapshot: bool = False
    stored: tuple[BlockHash, ...] = ()
    removed: tuple[BlockHash, ...] = ()


@dataclass(slots=True)
class Block:
    block_id: BlockId
    ref_count: int = 0
    hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks is {num_blocks}; the pool needs at least one block")
        self.blocks = [Block(BlockId(i)) for i in range(num_blocks)]
        # Every block with ref_count 0, least recently freed first. Values unused: an ordered set.
        self._queue: OrderedDict[BlockId, None] = OrderedDict((b.block_id, None) for b in self.blocks)
        self._by_hash: dict[BlockHash, BlockId] = {}
        self._stored: list[BlockHash] = []
        self._removed: list[BlockHash] = []
        self._events_lost = True  # the first take is a snapshot

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks allocatable now: free plus cached (cached ones are evicted on demand)."""
        return len(self._queue)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> BlockId | None:
        """The block caching this hash, held or not."""
        return self._by_hash.get(block_hash)

    def allocate(self, n: int) -> list[BlockId]:
        """Take n blocks, least recently freed first; each comes back with ref_count 1."""
        if n > len(self._queue):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._queue)} of {self.num_blocks} are free")
        taken: list[BlockId] = []
        for _ in range(n):
            block_id, _ = self._queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:
                del self._by_hash[block.hash]
                self._record(self._removed, block.hash)
                block.hash = None
            block.ref_count = 1
            taken.append(block_id)
        return taken

    def touch(self, block_ids: Iterable[BlockId]) -> None:
        """Take another reference on blocks found through lookup (a prefix-cache hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._queue[block_id]
            block.ref_count += 1

    def free(self, block_ids: Sequence[BlockId]) -> None:
        """Drop one reference on each block; pass a request's blocks in order (freed tail first)."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than held"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._queue[block_id] = None

    def cache(self, block_id: BlockId, block_hash: BlockHash) -> None:
        """Record that a held, now full, block holds the prefix `block_hash`.

        If another block already caches the same hash (two requests computed the same prefix at
        once) the first keeps it; this block stays uncached and is simply freed later.
        """
        block = self.blocks[block_id]
        assert block.ref_count > 0, "only a held block can be cached"
        if block.hash is not None or block_hash in self._by_hash:
            return
        block.hash = block_hash
        self._by_hash[block_hash] = block_id
        self._record(self._stored, block_hash)

    def take_events(self, snapshot: bool = False) -> KVEvents:
        """The changes since the last take, or a snapshot when asked for or when changes were lost."""
        if snapshot or self._events_lost:
            events = KVEvents(snapshot=True, stored=tuple(self._by_hash))
        else:
            events = KVEvents(stored=tuple(self._stored), removed=tuple(self._removed))
        self._stored, self._removed, self._events_lost = [], [], False
        return events

    def _record(self, events: list[BlockHash], block_hash: BlockHash) -> None:
        if self._events_lost:
            return  # a snapshot comes next anyway
        events.append(block_hash)
        if len(self._stored) + len(self._removed) > _MAX_EVENTS_PER_BLOCK * len(self.blocks):
            self._stored, self._removed, self._events_lost = [], [], True
