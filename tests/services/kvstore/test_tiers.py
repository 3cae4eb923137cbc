"""The store's tiers and custody, narrated: memory then disk under one LRU order, generations,
pins, restarts, namespaces. Blocks land the way an offer's push lands them (written into the
slots the offer handed out, then `landed`), and are read back the way a fetch reads them.

The layout is small: a block is 2 layers x K/V x 4 tokens x 1 head x 8 dims, 512 bytes of float32.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from services.kvstore.config import TierConfig
from services.kvstore.namespace import Namespace
from services.kvstore.slab import block_bytes
from services.kvstore.store import BlockStore
from services.status import NoCapacity, StaleBlock

LAYOUT = KVLayout("tiny-model", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=8)
BLOCK = block_bytes(LAYOUT)  # 512
FILE = BLOCK + 32  # a block on disk: its header, then the block
H = [BlockHash(0x1000 + i) for i in range(16)]


def store_of(tmp_path: Path | None, memory_blocks: int, disk_blocks: int = 0, namespaces: int = 2) -> BlockStore:
    tiers = TierConfig(
        memory_bytes=memory_blocks * BLOCK, disk_path=tmp_path, disk_bytes=max(1, disk_blocks * FILE),
        max_namespaces=namespaces,
    )  # fmt: skip
    store = BlockStore(tiers, pin=False)
    store.start()
    return store


def created(store: BlockStore, layout: KVLayout) -> Namespace:
    """The layout's namespace, as an offer after its memory came finds it: a layout past the first
    has its memory allocated on the store's thread at its first offer, which wants nothing."""
    ns = store.namespace(layout, create=True)
    if ns is None:
        store.memory.allocate().result()
        ns = store.namespace(layout, create=True)
    assert ns is not None
    return ns


def put(ns: Namespace, *hashes: BlockHash) -> list[int]:
    """Offer the blocks, write each slot as a worker's push would, land them; the positions wanted."""
    wanted, slots = ns.offer(list(hashes))
    for position, slot in zip(wanted, slots, strict=True):
        for layer, kv in enumerate(ns.caches.tensors):
            kv[:, slot] = value_of(hashes[position], layer)
    ns.landed([hashes[i] for i in wanted], slots, ok=True)
    return wanted


def value_of(block_hash: BlockHash, layer: int) -> float:
    return float(block_hash % 997) + layer / 10


async def fetch(ns: Namespace, hashes: list[BlockHash], generations: list[int]) -> list[bool]:
    """Pin, load into memory, check every byte against what was stored, unpin."""
    entries = ns.pin(hashes, generations)
    try:
        slots = await ns.load(entries)
        return [
            all(bool((kv[:, slot] == value_of(h, layer)).all()) for layer, kv in enumerate(ns.caches.tensors))
            for h, slot in zip(hashes, slots, strict=True)
        ]
    finally:
        ns.unpin(entries)


def held(ns: Namespace) -> tuple[set[BlockHash], set[BlockHash]]:
    """(blocks in memory, blocks on disk)."""
    memory = {h for h, e in ns.blocks.items() if e.slot is not None}
    return memory, set(ns.blocks) - memory


def test_without_disk_memory_keeps_the_most_recently_used_blocks(tmp_path: Path) -> None:
    store = store_of(None, memory_blocks=3)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    for h in H[:3]:
        put(ns, h)
    put(ns, H[0])  # offered again: held already, so used again and not wanted
    put(ns, H[3])  # room for it: the least recently used, H[1], is dropped

    assert held(ns) == ({H[0], H[2], H[3]}, set())
    assert store.lookup(LAYOUT, [H[0]]) != [] and store.lookup(LAYOUT, [H[1]]) == []
    events = ns.take_events(snapshot=False)
    assert events.snapshot  # the first take after start is always a snapshot
    put(ns, H[4])
    assert ns.take_events(snapshot=False).removed == (H[2],)
    assert store.counters.evicted_blocks == 2 and store.counters.stored_blocks == 5


def test_an_offer_larger_than_memory_takes_its_leading_blocks(tmp_path: Path) -> None:
    store = store_of(None, memory_blocks=4)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None

    assert put(ns, *H[:6]) == [0, 1, 2, 3]  # the blocks landing cannot make room for each other
    assert store.lookup(LAYOUT, H[:6]) == [ns.blocks[h].generation for h in H[:4]]
    assert ns.memory_used_bytes == 4 * BLOCK


async def test_lru_runs_from_memory_to_disk_and_the_disk_drops_its_oldest(tmp_path: Path) -> None:
    store = store_of(tmp_path, memory_blocks=2, disk_blocks=3)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    for h in H[:4]:
        put(ns, h)
    assert held(ns) == ({H[2], H[3]}, {H[0], H[1]})  # demoted, oldest first

    put(ns, H[4])
    put(ns, H[5])  # H[3] goes to disk, which is full: its oldest, H[0], is dropped
    assert held(ns) == ({H[4], H[5]}, {H[1], H[2], H[3]})
    assert store.lookup(LAYOUT, H[:6]) == []
    # (a lookup answers at most what one fetch can push from memory: 2 blocks here)
    assert store.lookup(LAYOUT, H[1:6]) == [ns.blocks[h].generation for h in H[1:3]]
    assert store.status().disk_used_bytes == 3 * FILE and store.counters.demoted_blocks == 4
    assert store.counters.evicted_blocks == 1

    # A fetch reads H[1] back from disk, byte for byte, under the generation it was stored with;
    # memory makes room by sending its least recently used block, H[4], to disk (dropping H[2]).
    generation = ns.blocks[H[1]].generation
    assert await fetch(ns, [H[1]], [generation]) == [True]
    assert ns.blocks[H[1]].generation == generation
    assert held(ns) == ({H[1], H[5]}, {H[3], H[4]})
    assert store.counters.promoted_blocks == 1


async def test_a_block_being_read_is_never_moved_or_dropped(tmp_path: Path) -> None:
    store = store_of(None, memory_blocks=2)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    put(ns, H[0])
    put(ns, H[1])
    reading = ns.pin([H[0]], [ns.blocks[H[0]].generation])
    put(ns, H[1])  # used again: H[0] is the least recently used block now

    put(ns, H[2])  # H[0] would go first, but it is being read: H[1] goes instead
    assert held(ns)[0] == {H[0], H[2]}
    second = ns.pin([H[2]], [ns.blocks[H[2]].generation])
    assert put(ns, H[3]) == []  # every memory block is being read: nothing can be taken
    ns.unpin(reading + second)
    assert put(ns, H[3]) == [0]


async def test_a_fetch_naming_an_old_generation_is_refused_whole(tmp_path: Path) -> None:
    store = store_of(None, memory_blocks=2)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    put(ns, H[0], H[1])
    looked_up = store.lookup(LAYOUT, H[:2])
    put(ns, H[2])  # H[0] dropped ...
    put(ns, H[0])  # ... and stored again: the same hash under a new generation

    assert ns.blocks[H[0]].generation not in looked_up
    with pytest.raises(StaleBlock, match=r"block_hashes\[0\]: 0000000000001000 has generation"):
        ns.pin(H[:2], looked_up)
    with pytest.raises(StaleBlock, match="is gone"):
        ns.pin([H[1]], looked_up[1:])
    assert all(e.readers == 0 for e in ns.blocks.values())  # a refused fetch pins nothing


async def test_a_restarted_store_keeps_its_disk_under_new_generations(tmp_path: Path) -> None:
    store = store_of(tmp_path, memory_blocks=2, disk_blocks=4)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    for h in H[:4]:
        put(ns, h)  # H[0] and H[1] go to disk
    before = store.lookup(LAYOUT, H[:2])
    assert len(before) == 2
    store.close()  # the writes under way finish; memory (H[2], H[3]) is lost with the process

    restarted = store_of(tmp_path, memory_blocks=2, disk_blocks=4)
    ns = restarted.namespace(LAYOUT)
    assert ns is not None
    after = restarted.lookup(LAYOUT, H[:3])
    assert len(after) == 2 and set(after).isdisjoint(before)  # restored, never served as what was seen
    with pytest.raises(StaleBlock):
        ns.pin(H[:2], before)
    assert await fetch(ns, H[:2], after) == [True, True]
    assert restarted.counters.restored_blocks == 2


async def test_a_corrupt_file_is_refused_and_dropped(tmp_path: Path) -> None:
    store = store_of(tmp_path, memory_blocks=1, disk_blocks=4)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    put(ns, H[0])
    put(ns, H[1])  # H[0] to disk
    store.close()
    assert ns.disk is not None
    path = ns.disk.directory / f"{H[0]:016x}.kv"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(raw)

    restarted = store_of(tmp_path, memory_blocks=1, disk_blocks=4)
    ns = restarted.namespace(LAYOUT)
    assert ns is not None
    with pytest.raises(StaleBlock, match="checksum"):
        await fetch(ns, [H[0]], restarted.lookup(LAYOUT, [H[0]]))
    assert restarted.lookup(LAYOUT, [H[0]]) == []


async def test_another_dtype_or_model_never_sees_a_block(tmp_path: Path) -> None:
    store = store_of(None, memory_blocks=4, namespaces=3)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    put(ns, *H[:2])
    generations = store.lookup(LAYOUT, H[:2])

    for other in (replace(LAYOUT, dtype="bfloat16"), replace(LAYOUT, model_fingerprint="other-model")):
        assert store.lookup(other, H[:2]) == []
        other_ns = created(store, other)
        with pytest.raises(StaleBlock):
            other_ns.pin(H[:2], generations)
    with pytest.raises(NoCapacity, match="max_namespaces"):
        store.namespace(replace(LAYOUT, block_size=8), create=True)


async def test_byte_capacities_hold_under_a_random_load(tmp_path: Path) -> None:
    store = store_of(tmp_path, memory_blocks=5, disk_blocks=7)
    ns = store.namespace(LAYOUT, create=True)
    assert ns is not None
    rng = random.Random(0)
    hashes = [BlockHash(0x5000 + i) for i in range(40)]
    for _ in range(400):
        chain = rng.sample(hashes, rng.randrange(1, 5))
        if rng.random() < 0.5:
            wanted, slots = ns.offer(chain)
            ns.landed([chain[i] for i in wanted], slots, ok=rng.random() < 0.9)  # some pushes fail
        else:
            found = store.lookup(LAYOUT, chain)
            if found:
                entries = ns.pin(chain[: len(found)], found)
                await ns.load(entries)
                ns.unpin(entries)
        status = store.status()
        assert status.memory_used_bytes <= 5 * BLOCK
        assert status.disk_used_bytes <= 7 * FILE
        assert status.num_memory_blocks * BLOCK <= status.memory_used_bytes
    store.close()
    assert ns.disk is not None
    on_disk = sum(p.stat().st_size for p in ns.disk.directory.glob("*.kv"))
    assert on_disk == store.status().disk_used_bytes <= 7 * FILE
