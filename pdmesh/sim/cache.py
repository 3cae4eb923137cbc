"""A simulated worker's prefix cache: which prompt blocks it holds, least recently used first.

Blocks are named by the trace's hash ids (a Mooncake block id names a prompt prefix), and the
cache reports its changes as the engine's block pool does (engine.block_pool.KVEvents), so the
scheduler's registry keeps its view of them through the same code as for real workers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.block_pool import KVEvents
from engine.ids import BlockHash


class PrefixCache:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(0, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._stored: list[int] = []
        self._removed: list[int] = []

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, blocks: Sequence[int]) -> int:
        """How many leading blocks it holds (touched: recently used)."""
        found = 0
        for block in blocks:
            if block not in self._blocks:
                break
            self._blocks.move_to_end(block)
            found += 1
        return found

    def insert(self, blocks: Sequence[int]) -> None:
        """A request's computed blocks, now reusable; the least recently used make room."""
        for block in blocks:
            if block in self._blocks:
                self._blocks.move_to_end(block)
                continue
            self._blocks[block] = None
            self._stored.append(block)
        self.shrink_to(self.capacity)

    def shrink_to(self, num_blocks: int) -> None:
        while len(self._blocks) > max(0, num_blocks):
            block, _ = self._blocks.popitem(last=False)
            self._removed.append(block)

    def take_events(self, snapshot: bool) -> KVEvents:
        if snapshot:
            self._stored, self._removed = [], []
            return KVEvents(snapshot=True, stored=tuple(BlockHash(b) for b in self._blocks))
        # Net changes: a block stored and evicted since the last take is not reported stored.
        stored = tuple(BlockHash(b) for b in dict.fromkeys(self._stored) if b in self._blocks)
        removed = tuple(BlockHash(b) for b in dict.fromkeys(self._removed) if b not in self._blocks)
        self._stored, self._removed = [], []
        return KVEvents(stored=stored, removed=removed)
