"""The store's memory tier is allocated before the store serves, never on its event loop.

On a GPU machine the store's memory is pinned, and pinning GiBs takes seconds: allocated at the
first offer, on the loop, it stalled every call and each worker's first offer missed its deadline
(an H200 run: no block ever landed). Here, without a GPU, the allocation is made as slow as
pinning is, by holding it until the test lets it finish; everything else is the real store.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from pdmesh.config import ServerConfig
from services.kvstore import memory
from services.kvstore.config import KVStoreConfig, TierConfig
from services.kvstore.server import serve_kvstore
from services.kvstore.slab import block_bytes
from services.kvstore.store import BlockStore

LAYOUT = KVLayout("tiny-model", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=8)
OTHER = KVLayout("other-model", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=8)
BLOCK = block_bytes(LAYOUT)
H = [BlockHash(0x1000 + i) for i in range(4)]
_SERVING = health_pb2.HealthCheckResponse.SERVING


class SlowAllocation:
    """allocate_arena held until `release` (as cudaHostAlloc holds for seconds), noting its threads."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.threads: list[threading.Thread] = []
        self._allocate = memory.allocate_arena

    def __call__(self, nbytes: int, pin: bool, path: Path | None = None) -> object:
        self.threads.append(threading.current_thread())
        self.gate.wait(60)
        return self._allocate(nbytes, pin, path)


@pytest.fixture
def slow(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowAllocation]:
    allocation = SlowAllocation()
    monkeypatch.setattr(memory, "allocate_arena", allocation)
    yield allocation
    allocation.gate.set()


async def test_the_first_offer_finds_the_memory_allocated_at_start(slow: SlowAllocation) -> None:
    store = BlockStore(TierConfig(memory_bytes=8 * BLOCK, max_namespaces=2), pin=False)
    starting = asyncio.ensure_future(asyncio.to_thread(store.start))
    await asyncio.sleep(0.1)  # the loop runs on while the memory is allocated

    assert not store.ready
    assert store.namespace(LAYOUT, create=True) is None  # an offer now wants nothing, at once
    assert store.lookup(LAYOUT, H) == []
    slow.gate.set()
    await starting

    assert store.ready
    ns = store.namespace(LAYOUT, create=True)  # the first offer: nothing more to allocate
    assert ns is not None and ns.num_slots == 8
    assert len(slow.threads) == 1 and slow.threads[0] is not threading.main_thread()
    store.close()


async def test_a_second_layouts_memory_comes_on_a_thread_while_its_offers_want_nothing(
    slow: SlowAllocation,
) -> None:
    slow.gate.set()
    store = BlockStore(TierConfig(memory_bytes=8 * BLOCK, max_namespaces=2), pin=False)
    await asyncio.to_thread(store.start)
    assert store.namespace(LAYOUT, create=True) is not None
    slow.gate.clear()

    assert store.namespace(OTHER, create=True) is None  # allocation starts, the offer wants nothing
    assert store.namespace(OTHER, create=True) is None  # still allocating: not a second allocation
    slow.gate.set()
    await asyncio.wrap_future(store.memory.allocate())
    assert store.namespace(OTHER, create=True) is not None
    assert len(slow.threads) == 2 and threading.main_thread() not in slow.threads
    store.close()


async def test_the_store_is_not_serving_until_its_memory_is_allocated(slow: SlowAllocation) -> None:
    config = KVStoreConfig(scheduler="", memory_bytes=8 * BLOCK, server=ServerConfig(port=_free_port()))
    serving = asyncio.ensure_future(serve_kvstore(config))
    answered = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{config.server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "pdmesh.v1.KVStore"):
                assert await _status(health, service) != _SERVING
            answered = True  # the server runs: its SIGTERM handler is in place
            slow.gate.set()
            for service in ("", "pdmesh.v1.KVStore"):
                assert await _status(health, service, until=_SERVING) == _SERVING
    finally:
        if answered:
            os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: drain and stop
            await asyncio.wait_for(serving, 60)
        else:
            serving.cancel()


async def _status(health: health_pb2_grpc.HealthStub, service: str, until: int | None = None) -> int:
    """The service's health, once the server answers (and, with `until`, once it says so)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            if until is None or reply.status == until or asyncio.get_running_loop().time() > deadline:
                return int(reply.status)
        except grpc.aio.AioRpcError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
