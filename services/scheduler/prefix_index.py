"""The scheduler's index of where each prefix lives: which workers' prefix caches, and which KV
stores, hold each block.

Workers and stores report the blocks they stored and removed (KVEvents, in batches with their
periodic reports); the index keeps, per KV layout, the locations holding each block hash. Chain
hashes make a prefix match a walk: block i's hash covers every token up to its end, so a location
holding the hashes of blocks 0..k-1 holds the prompt's first k blocks. `match` answers the one
question placement asks: for a prompt's hashes, how many leading blocks each location holds.

A location is a worker id or a store id. A snapshot replaces what the index knew of a location;
a location that leaves (or restarts) is forgotten. Torch-free, protobuf-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_pool import KVEvents
from engine.ids import BlockHash
from engine.kv_layout import KVLayout


@dataclass(frozen=True)
class PrefixMatch:
    """How much of one prompt each location holds, as leading blocks of `block_size` tokens."""

    block_size: int
    blocks: dict[str, int] = field(default_factory=dict)  # location -> leading blocks held (absent: 0)

    def tokens(self, location: str) -> int:
        return self.blocks.get(location, 0) * self.block_size

    def best(self, locations: Sequence[str]) -> int:
        """The most tokens any of the locations holds."""
        return max((self.tokens(loc) for loc in locations), default=0)


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[KVLayout, dict[BlockHash, set[str]]] = {}
        self._held: dict[str, dict[KVLayout, set[BlockHash]]] = {}
        self.version = 0  # changes with every apply or forget: a match is good until it does

    def apply(self, location: str, layout: KVLayout, events: KVEvents) -> None:
        """A location's changes in one layout (a snapshot replaces what was known of it there)."""
        self.version += 1
        if events.snapshot:
            self._drop(location, layout)
        held = self._held.setdefault(location, {}).setdefault(layout, set())
        holders = self._holders.setdefault(layout, {})
        for block_hash in events.removed:
            if block_hash in held:
                held.discard(block_hash)
                self._release(holders, block_hash, location)
        for block_hash in events.stored:
            if block_hash not in held:
                held.add(block_hash)
                holders.setdefault(block_hash, set()).add(location)

    def forget(self, location: str) -> None:
        """Everything the location held (it left, restarted, or its events were lost)."""
        self.version += 1
        for layout in list(self._held.get(location, {})):
            self._drop(location, layout)
        self._held.pop(location, None)

    def match(self, layout: KVLayout, hashes: Sequence[BlockHash]) -> PrefixMatch:
        """For each location holding the first block, the length of its leading run of `hashes`."""
        holders = self._holders.get(layout, {})
        found: dict[str, int] = {}
        alive = set(holders.get(hashes[0], ())) if hashes else set()
        for i, block_hash in enumerate(hashes):
            here = holders.get(block_hash, set())
            for location in alive - here:
                found[location] = i
            alive &= here
            if not alive:
                break
        for location in alive:
            found[location] = len(hashes)
        return PrefixMatch(layout.block_size, found)

    def num_blocks(self, location: str) -> int:
        """Blocks the index lists for the location, over every layout."""
        return sum(len(h) for h in self._held.get(location, {}).values())

    def _drop(self, location: str, layout: KVLayout) -> None:
        held = self._held.get(location, {}).pop(layout, set())
        holders = self._holders.get(layout, {})
        for block_hash in held:
            self._release(holders, block_hash, location)

    @staticmethod
    def _release(holders: dict[BlockHash, set[str]], block_hash: BlockHash, location: str) -> None:
        owners = holders.get(block_hash)
        if owners is not None:
            owners.discard(location)
            if not owners:
                del holders[block_hash]
