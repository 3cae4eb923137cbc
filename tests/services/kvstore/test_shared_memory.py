"""The store's memory shared with the workers of its host (/dev/shm): blocks offered and fetched
by copying, byte-exact, with the same custody as over UCX; a worker SIGKILLed holding a fetch's
pins and an offer's slots strands nothing past the leases; a worker of another host (boot id)
keeps UCX; a store restarted under the same name is never read through the old mapping."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from store_process import BLOCK_BYTES, LAYOUT, TOKENS_KILLED, SharedUser, StoreProcess, StoreUser, free_ports

from kvtransfer import shm
from services.worker.shared_memory import needs_remap
from services.worker.store_client import StaleLookup

pytestmark = pytest.mark.slow
TOKENS = list(range(100, 124))  # 6 blocks of 4
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def store() -> Iterator[StoreProcess]:
    port, kv_port = free_ports()
    process = StoreProcess(port, kv_port, None, memory_bytes=8 * BLOCK_BYTES)
    yield process.start()
    process.stop()


@pytest.fixture(scope="module")
def user(store: StoreProcess) -> Iterator[SharedUser]:
    u = SharedUser(store.address)
    yield u
    u.close()


def wait_for(condition: object, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


def test_blocks_go_through_shared_memory_byte_exact(store: StoreProcess, user: SharedUser) -> None:
    mapped = user.mapped()
    assert mapped is not None and mapped.info.path.startswith("/dev/shm/pdmesh-")
    hashes = user.chain(TOKENS)
    assert user.offer(hashes, list(range(6))).wanted == list(range(6))
    assert user.offer(hashes, list(range(6))).wanted == []  # held already

    generations = user.run(user.client.lookup(hashes))
    assert len(generations) == 6
    assert user.fetch(hashes, generations, into=list(range(20, 26)))
    ucx = StoreUser(store.address)  # the same blocks over UCX: the same bytes
    try:
        assert ucx.fetch(hashes, generations, into=list(range(30, 36)))
        status = ucx.status()
    finally:
        ucx.close()
    assert status.shared_memory and status.num_leases == 0 and status.num_stored_blocks == 6
    assert status.memory_used_bytes == 6 * BLOCK_BYTES

    with pytest.raises(StaleLookup, match="not the generation"):  # custody as over UCX
        user.pin(hashes[:2], [generations[1], generations[0]])
    other = SharedUser(store.address, replace(LAYOUT, dtype="bfloat16"))
    try:  # another dtype: another namespace, another arena
        assert other.mapped() is not None and other.mapped().info.path != mapped.info.path  # type: ignore[union-attr]
        assert other.run(other.client.lookup(hashes)) == []
        with pytest.raises(StaleLookup):
            other.pin(hashes, generations)
    finally:
        other.close()


def test_a_worker_killed_between_the_calls_strands_nothing(store: StoreProcess, user: SharedUser) -> None:
    hashes = user.chain(TOKENS_KILLED)
    user.offer(hashes[:2], [40, 41])  # the blocks the killed worker pins
    before = user.run(user.client.lookup(hashes[:2]))
    worker = subprocess.Popen([sys.executable, str(HERE / "shm_worker.py"), store.address, "1500"],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert worker.stdout is not None
        lines = iter(worker.stdout.readline, "")  # its logs, then what it holds
        assert any(line.startswith("holding 2 pinned, 2 offered") for line in lines)
        status = user.status()
        assert status.num_leases == 2
        worker.kill()
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    wait_for(lambda: user.status().num_leases == 0)
    status = user.status()
    assert status.num_leases == 0 and status.num_leases_expired == 2
    assert status.memory_used_bytes == status.num_memory_blocks * BLOCK_BYTES  # no slot held without a block
    assert user.run(user.client.lookup(hashes[2:4])) == []  # offered, never committed: not stored
    assert user.fetch(hashes[:2], before, into=[42, 43])  # unpinned, unchanged
    fill = user.chain(list(range(900, 932)))  # 8 new blocks: every block in memory must be evictable
    assert user.offer(fill, list(range(8))).wanted == list(range(8))


def test_a_worker_of_another_host_uses_ucx(store: StoreProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "boot_id", lambda: "another-host")
    elsewhere = SharedUser(store.address)
    try:
        assert elsewhere.mapped() is None and elsewhere.link.gave_up
    finally:
        elsewhere.close()


def test_a_restarted_store_is_never_read_through_the_old_mapping(store: StoreProcess, user: SharedUser) -> None:
    old = user.mapped()
    assert old is not None
    hashes = user.chain(list(range(700, 708)))
    user.offer(hashes, [0, 1])
    generations = user.lookup_generations(hashes)
    assert len(generations) == 2
    store.kill()  # its file stays; the new store replaces it with a new arena
    store.start()
    with pytest.raises(StaleLookup) as refused:
        user.pin(hashes, generations)
    assert needs_remap(refused.value)
    user.link.forget()  # what a worker does on that refusal
    new = user.mapped()
    assert new is not None and new.info.path == old.info.path and new.info.arena_id != old.info.arena_id
