"""The store's blocks, every namespace: lookups, offers, fetches and what a report tells.

BlockStore owns one Namespace per KV layout met (created at a layout's first offer, or found on
disk at start), the host memory they are cut from (memory.py: allocated at start, off the event
loop), the generation counter and the counters. Generations are unique for the life of the disk
directory: a 32-bit epoch drawn at start above a per-run counter, so a block restored after a
restart never carries a generation a lookup saw before it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import secrets
from collections.abc import Sequence

import torch

from engine.block_pool import KVEvents
from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from kvtransfer.shm import ArenaInfo, boot_id
from services.kvstore.config import TierConfig
from services.kvstore.disk import DiskShelf, known_namespaces
from services.kvstore.memory import Arena, HostMemory
from services.kvstore.namespace import Namespace
from services.kvstore.slab import HostSlab, block_bytes
from services.kvstore.stats import StoreCounters, StoreStatus
from services.status import NoCapacity


class BlockStore:
    def __init__(self, tiers: TierConfig, pin: bool | None = None) -> None:
        self.tiers = tiers
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.counters = StoreCounters()
        self.namespaces: dict[KVLayout, Namespace] = {}
        self.memory = HostMemory(tiers.memory_bytes, self.pin, tiers.max_namespaces, tiers.shm_dir, tiers.name)
        self.arenas: dict[KVLayout, Arena] = {}
        self.ready = False  # start() is done: the memory tier is there and the disk restored
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-disk")
        self._epoch = secrets.randbits(32) << 32
        self._counter = itertools.count(1)

    def new_generation(self) -> int:
        return self._epoch | next(self._counter)

    def start(self) -> None:
        """Allocate the memory tier, then index the blocks a previous run left on disk. Blocking
        (seconds when pinned): run it on a thread before the store says it serves."""
        self.memory.allocate().result()
        self.restore()
        self.ready = True

    def restore(self) -> None:
        """Index the blocks a previous run left on disk, each under a new generation."""
        if self.tiers.disk_path is None:
            return
        for layout in known_namespaces(self.tiers.disk_path):
            if len(self.namespaces) < self.tiers.max_namespaces and self._fits(layout):
                self._create(layout, self.memory.take_now())

    def namespace(self, layout: KVLayout, create: bool = False) -> Namespace | None:
        """The layout's namespace; created when asked (NoCapacity past max_namespaces, or when one
        block is larger than the memory tier). None while its memory is still being allocated, or
        before start() is done."""
        namespace = self.namespaces.get(layout)
        if namespace is None and create and self.ready:
            if len(self.namespaces) >= self.tiers.max_namespaces:
                raise NoCapacity(
                    "kv_layout", f"the store holds {len(self.namespaces)} KV layouts already",
                    "raise the store's max_namespaces, or run a store per model",
                )  # fmt: skip
            if not self._fits(layout):
                raise NoCapacity(
                    "kv_layout", f"one block is {block_bytes(layout)} bytes, more than the store's memory tier",
                    "raise the store's memory_bytes",
                )  # fmt: skip
            arena = self.memory.take()  # None: allocating on its thread; the offer wants nothing
            namespace = self._create(layout, arena) if arena is not None else None
        return namespace

    def shared(self, layout: KVLayout) -> ArenaInfo | None:
        """Where a worker of this host maps the layout's memory; None when it is private memory
        (or the namespace does not exist yet)."""
        arena, namespace = self.arenas.get(layout), self.namespaces.get(layout)
        if arena is None or arena.path is None or namespace is None:
            return None
        return ArenaInfo(str(arena.path), arena.tensor.numel(), arena.arena_id, namespace.num_slots, boot_id())

    def lookup(self, layout: KVLayout, hashes: Sequence[BlockHash]) -> list[int]:
        namespace = self.namespaces.get(layout)
        found = namespace.lookup(hashes) if namespace is not None else []
        self.counters.lookups += 1
        self.counters.lookup_blocks += len(hashes)
        self.counters.lookup_hit_blocks += len(found)
        return found

    def take_events(self, snapshot: bool) -> list[tuple[KVLayout, KVEvents]]:
        return [(layout, ns.take_events(snapshot)) for layout, ns in self.namespaces.items()]

    def status(self) -> StoreStatus:
        spaces = list(self.namespaces.values())  # start() may be adding to it on its thread
        return StoreStatus(
            memory_capacity_bytes=self.tiers.memory_bytes,
            memory_used_bytes=sum(ns.memory_used_bytes for ns in spaces),
            disk_capacity_bytes=self.tiers.disk_bytes if self.tiers.disk_path is not None else 0,
            disk_used_bytes=sum(ns.disk.used_bytes for ns in spaces if ns.disk is not None),
            num_namespaces=len(self.namespaces),
            num_memory_blocks=sum(ns.num_memory_blocks for ns in spaces),
            num_disk_blocks=sum(ns.num_disk_blocks for ns in spaces),
            shared_memory=self.memory.shared,
            counters=self.counters,
        )

    def close(self) -> None:
        """Finish the file writes under way (what is on disk survives a restart)."""
        self._io.shutdown(wait=True)
        self.memory.close()

    def _fits(self, layout: KVLayout) -> bool:
        return block_bytes(layout) <= self.tiers.memory_bytes

    def _create(self, layout: KVLayout, arena: Arena) -> Namespace:
        disk = None
        if self.tiers.disk_path is not None:
            disk = DiskShelf(self.tiers.disk_path, layout, self.tiers.disk_bytes, self._io)
        namespace = Namespace(HostSlab(layout, arena.tensor), disk, self.new_generation, self.counters)
        self.arenas[layout] = arena
        if disk is not None:
            namespace.restore(disk.restore())  # what a previous run left, under new generations
        self.namespaces[layout] = namespace
        return namespace
