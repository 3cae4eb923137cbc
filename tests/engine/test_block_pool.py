"""Block pool scenarios with exact block ids: allocation order, sharing, eviction, counts."""

from __future__ import annotations

import pytest

from engine.block_hash import chain_hashes
from engine.block_pool import BlockPool, KVEvents
from engine.errors import OutOfBlocks
from engine.ids import BlockHash, BlockId


def ids(*xs: int) -> list[BlockId]:
    return [BlockId(x) for x in xs]


def test_allocation_takes_lowest_ids_first_and_counts_down() -> None:
    pool = BlockPool(8)
    assert pool.allocate(3) == ids(0, 1, 2)
    assert pool.num_free == 5
    assert [pool.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 0]


def test_asking_for_more_than_free_raises_and_takes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(OutOfBlocks, match="asked for 2 blocks, 1 of 4 are free"):
        pool.allocate(2)
    assert pool.num_free == 1


def test_freed_blocks_return_tail_first_and_are_reused_in_that_order() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)  # 0 1 2
    pool.allocate(3)  # 3 4 5
    pool.free(a)  # queue: 2 1 0 (the request's tail goes back first)
    assert pool.allocate(2) == ids(2, 1)


def test_a_shared_block_is_free_only_after_every_holder_lets_go() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.cache(b, BlockHash(42))
    pool.touch([pool.lookup(BlockHash(42))])  # a second request hits the cache
    assert pool.blocks[b].ref_count == 2
    pool.free([b])
    assert pool.num_free == 3  # still held by the second request
    pool.free([b])
    assert pool.num_free == 4


def test_cached_free_blocks_are_reusable_until_evicted_least_recent_first() -> None:
    pool = BlockPool(3)
    x, y, z = pool.allocate(3)
    pool.cache(x, BlockHash(100))
    pool.cache(y, BlockHash(200))
    pool.free([x])
    pool.free([y])
    pool.free([z])  # queue: x(100) y(200) z
    assert pool.num_cached == 2 and pool.num_free == 3
    # A hit takes a cached block back out of the queue without evicting anything.
    pool.touch([pool.lookup(BlockHash(200))])
    assert pool.allocate(1) == [x]  # least recently freed: its hash is evicted
    assert pool.lookup(BlockHash(100)) is None
    assert pool.lookup(BlockHash(200)) == y
    assert pool.allocate(1) == [z]
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)


def test_the_first_block_to_cache_a_hash_keeps_it() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, BlockHash(7))
    pool.cache(b, BlockHash(7))  # computed the same prefix concurrently
    assert pool.lookup(BlockHash(7)) == a
    assert pool.blocks[b].hash is None


def test_chain_hashes_cover_whole_prefixes_and_are_namespaced_by_model() -> None:
    tokens = list(range(10))
    h = chain_hashes(tokens, block_size=4, model_fingerprint="m1")
    assert len(h) == 2  # the partial third block has no hash yet
    assert chain_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4, "m1")[0] == h[0]
    assert chain_hashes([0, 1, 2, 3, 9, 9, 9, 9], 4, "m1")[1] != h[1]
    assert chain_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4, "m1")[1] != h[1]  # same block, other parent
    assert chain_hashes(tokens, 4, "m2")[0] != h[0]
    assert chain_hashes(tokens, 4, "m1", start=1, parent=h[0]) == h[1:]


def test_cache_changes_are_taken_as_events_starting_with_a_snapshot() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, BlockHash(11))
    assert pool.take_events() == KVEvents(snapshot=True, stored=(BlockHash(11),))

    pool.cache(b, BlockHash(22))
    pool.free([a, b])
    pool.allocate(4)  # evicts both cached hashes, the tail (freed first) first
    assert pool.take_events() == KVEvents(stored=(BlockHash(22),), removed=(BlockHash(22), BlockHash(11)))
    assert pool.take_events() == KVEvents()
    assert pool.take_events(snapshot=True) == KVEvents(snapshot=True)


def test_an_untaken_event_record_is_bounded_and_turns_into_a_snapshot() -> None:
    pool = BlockPool(1)
    pool.take_events()
    for i in range(10):  # cache and evict the one block, over and over
        (block,) = pool.allocate(1)
        pool.cache(block, BlockHash(i))
        pool.free([block])
    assert pool.take_events() == KVEvents(snapshot=True, stored=(BlockHash(9),))
