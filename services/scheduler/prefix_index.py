"""The scheduler's index of where each prefix lives: which workers' prefix caches, and which KV
stores, hold each block.

Workers and stores report the blocks they stored and removed (KVEvents, in batches with their
periodic reports); the index keeps, per KV layout, the locations holding each block hash. Chain
hashes make a prefix match a walk: block i's hash covers every token up to its end, so a location
holding the hashes of blocks 0..k-1 holds the prompt's first k blocks. `match` answers the one
question placement asks: for a prompt's hashes, how many leading blocks each location holds.

A location is a worker id or a store id. A snapshot replaces what the index knew of a location;
a location that leaves (or restarts) is forgotten. Torch-free, protobuf-free.

Placements the reports cannot tell of yet. A worker reports a block only once it has computed
it, a report interval or more after the request was placed there; the next requests of the same
prefix, placed meanwhile, would see no one holding it and spread (each computing the prefix once
more). So a placement marks the blocks its worker will hold (`expect`): they match as held at
once. When the request's prefill ends the mark stays a grace period, for the worker's reports to
carry the blocks themselves (`settle`), then lapses; a request that ends without its prefill
drops its mark (`drop`). A mark never outlives its grace, so a worker that never reports the
blocks (it evicted them, or failed) stops attracting their prefix.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from collections.abc import Callable, Sequence
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


@dataclass(slots=True)
class _Mark:
    """Blocks a placed request's worker will hold once it has prefilled them."""

    location: str
    layout: KVLayout
    hashes: tuple[BlockHash, ...]
    lapses_at: float | None = None  # None: its prefill has not ended


class PrefixIndex:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._holders: dict[KVLayout, dict[BlockHash, set[str]]] = {}
        self._held: dict[str, dict[KVLayout, set[BlockHash]]] = {}
        self._marks: dict[str, _Mark] = {}  # request id -> what its placement will hold
        self._expected: dict[KVLayout, dict[BlockHash, Counter[str]]] = {}  # the marks, as holders
        self._lapsing: list[tuple[float, str]] = []  # a heap of (lapses_at, request id)
        self._version = 0

    @property
    def version(self) -> int:
        """Changes with every apply, forget, mark and lapse: a match is good until it does."""
        self._lapse()
        return self._version

    def apply(self, location: str, layout: KVLayout, events: KVEvents) -> None:
        """A location's changes in one layout (a snapshot replaces what was known of it there)."""
        self._version += 1
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
        """Everything the location held or was expected to (it left, restarted, or its events
        were lost)."""
        self._version += 1
        for layout in list(self._held.get(location, {})):
            self._drop(location, layout)
        self._held.pop(location, None)
        for request_id in [r for r, mark in self._marks.items() if mark.location == location]:
            self.drop(request_id)

    # ---- marks of placements
    def expect(self, request_id: str, location: str, layout: KVLayout, hashes: Sequence[BlockHash]) -> None:
        """The request was placed at `location`, which will hold `hashes` once it has prefilled
        them: they match as held there from now (replacing the request's earlier mark)."""
        self.drop(request_id)
        if not hashes:
            return
        self._version += 1
        self._marks[request_id] = _Mark(location, layout, tuple(hashes))
        expected = self._expected.setdefault(layout, {})
        for block_hash in hashes:
            expected.setdefault(block_hash, Counter())[location] += 1

    def settle(self, request_id: str, grace_s: float) -> None:
        """The request's prefill ended: its mark lapses in `grace_s`, by when the location's
        reports carry the blocks themselves. Once: a later call changes nothing."""
        mark = self._marks.get(request_id)
        if mark is not None and mark.lapses_at is None:
            mark.lapses_at = self.clock() + grace_s
            heapq.heappush(self._lapsing, (mark.lapses_at, request_id))

    def drop(self, request_id: str) -> None:
        """The request's mark, gone at once (it ended without its prefill, or was placed again)."""
        mark = self._marks.pop(request_id, None)
        if mark is None:
            return
        self._version += 1
        expected = self._expected[mark.layout]
        for block_hash in mark.hashes:
            counts = expected[block_hash]
            counts[mark.location] -= 1
            if counts[mark.location] <= 0:
                del counts[mark.location]
                if not counts:
                    del expected[block_hash]

    def _lapse(self) -> None:
        now = self.clock()
        while self._lapsing and self._lapsing[0][0] <= now:
            lapses_at, request_id = heapq.heappop(self._lapsing)
            mark = self._marks.get(request_id)
            if mark is not None and mark.lapses_at == lapses_at:  # not dropped or marked again since
                self.drop(request_id)

    def match(self, layout: KVLayout, hashes: Sequence[BlockHash]) -> PrefixMatch:
        """For each location holding the first block (or expected to, by a placement's mark), the
        length of its leading run of `hashes`."""
        self._lapse()
        holders = self._holders.get(layout, {})
        expected = self._expected.get(layout) or {}
        found: dict[str, int] = {}
        alive = set(self._here(holders, expected, hashes[0])) if hashes else set()
        for i, block_hash in enumerate(hashes):
            here = self._here(holders, expected, block_hash)
            for location in alive - here:
                found[location] = i
            alive &= here
            if not alive:
                break
        for location in alive:
            found[location] = len(hashes)
        return PrefixMatch(layout.block_size, found)

    @staticmethod
    def _here(
        holders: dict[BlockHash, set[str]], expected: dict[BlockHash, Counter[str]], block_hash: BlockHash
    ) -> set[str]:
        held = holders.get(block_hash, set())
        marked = expected.get(block_hash)
        return held | marked.keys() if marked else held  # read, never changed, by match

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
