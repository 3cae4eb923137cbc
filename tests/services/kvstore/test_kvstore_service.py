"""The KV store as a process, used the way workers use it: offer blocks and push them over UCX,
look a prefix up, fetch it into other blocks. Custody holds across a SIGKILL: the restarted store
serves what it finds on disk only under new generations, and nothing of another layout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from store_process import BLOCK_BYTES, LAYOUT, StoreProcess, StoreUser, free_ports

from pdmesh.convert import layout_to_pb
from pdmesh.v1 import common_pb2, kvstore_pb2

pytestmark = pytest.mark.slow
TOKENS = list(range(100, 180))  # 80 tokens: 20 blocks of 4


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreProcess]:
    port, kv_port = free_ports()
    disk = tmp_path_factory.mktemp("kvstore-disk")
    process = StoreProcess(port, kv_port, disk, memory_bytes=8 * BLOCK_BYTES, disk_bytes=64 * (BLOCK_BYTES + 32))
    yield process.start()
    process.stop()


@pytest.fixture(scope="module")
def user(store: StoreProcess) -> Iterator[StoreUser]:
    u = StoreUser(store.address)
    yield u
    u.close()


def test_an_offered_prefix_is_looked_up_and_fetched_byte_exact(store: StoreProcess, user: StoreUser) -> None:
    hashes = user.chain(TOKENS[:40])  # 10 blocks: 8 fit in memory, the oldest 2 go to disk
    assert user.offer(hashes, list(range(10))) == list(range(8))  # what memory can take at once
    assert user.offer(hashes, list(range(10))) == [8, 9]  # the first two go to disk to make room
    assert user.offer(hashes, list(range(10))) == []  # held already: nothing to push

    # A fetch is pushed from memory: a lookup answers at most as many blocks as memory holds.
    generations = user.lookup(hashes + user.chain(TOKENS)[10:12])
    assert len(generations) == 8 and len(set(generations)) == 8
    assert user.fetch(hashes[:8], generations, into=list(range(20, 28)))  # 2 read back from disk first

    status = user.status()
    assert (status.num_stored_blocks, status.num_fetches, status.num_fetched_blocks) == (10, 1, 8)
    assert status.num_demoted_blocks == 4 and status.num_promoted_blocks == 2
    assert status.memory_used_bytes <= status.memory_capacity_bytes == 8 * BLOCK_BYTES
    assert status.num_lookup_hit_blocks == 8 and status.num_fetches_in_flight == 0


def test_a_block_stored_under_one_dtype_or_model_is_never_served_to_another(user: StoreUser) -> None:
    hashes = user.chain(TOKENS[:8])
    user.offer(hashes, [40, 41])
    generations = user.lookup(hashes)
    assert len(generations) == 2

    for other in (replace(LAYOUT, dtype="bfloat16"), replace(LAYOUT, model_fingerprint="another-model")):
        assert user.lookup(hashes, layout=other) == []
        with pytest.raises(grpc.RpcError) as refused:
            user.stub.Fetch(kvstore_pb2.FetchRequest(
                kv_layout=layout_to_pb(other), block_hashes=hashes, generations=generations,
                ticket=common_pb2.KVTicket(ticket_id="t", kv_transfer_address="127.0.0.1:1", num_tokens=8,
                                           num_blocks=2, lease_expiry_unix_ms=int(time.time() * 1000) + 5000),
            ))  # fmt: skip
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_requests_are_refused_naming_the_field(user: StoreUser) -> None:
    with pytest.raises(grpc.RpcError) as no_layout:
        user.stub.Lookup(kvstore_pb2.LookupRequest(block_hashes=[1, 2]))
    assert no_layout.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kv_layout.model_fingerprint" in no_layout.value.details()
    with pytest.raises(grpc.RpcError) as unpaired:
        user.stub.Fetch(kvstore_pb2.FetchRequest(kv_layout=layout_to_pb(LAYOUT), block_hashes=[1, 2], generations=[3]))
    assert unpaired.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "generations" in unpaired.value.details()


def test_a_restarted_store_serves_nothing_stale(store: StoreProcess, user: StoreUser, tmp_path: Path) -> None:
    hashes = user.chain(TOKENS[40:80])[:8]  # 8 new blocks: the older blocks of earlier tests go to disk
    user.offer(hashes, list(range(10, 18)))
    before = user.lookup(user.chain(TOKENS[:40]))
    assert len(before) == 8
    assert store.disk is not None
    on_disk = user.status().num_disk_blocks
    deadline = time.monotonic() + 10
    while len(list(store.disk.glob("ns-*/*.kv"))) < on_disk and time.monotonic() < deadline:
        time.sleep(0.05)  # the store writes in the background; a block not yet written is lost with it

    store.kill()
    store.start()

    after = user.lookup(user.chain(TOKENS[:40]))
    assert len(after) == 8 and set(after).isdisjoint(before)  # restored, under new generations
    with pytest.raises(grpc.RpcError) as stale:
        user.fetch(user.chain(TOKENS[:40])[:8], before, into=list(range(30, 38)))
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not the generation" in stale.value.details()
    assert user.fetch(user.chain(TOKENS[:40])[:8], after, into=list(range(30, 38)))
    assert user.status().num_restored_blocks == on_disk
