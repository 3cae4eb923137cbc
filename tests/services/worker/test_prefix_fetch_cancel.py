"""A prefix fetch over UCX that is cancelled (the worker stops) before its task began, or while the
store's push is landing, fails its import at once, not when its lease runs out (two minutes here):
the request stops waiting, computes the prompt itself with the engine's every block back, and the
store's side of the fetch ends too.

A real store process over gRPC and UCX (tcp), a real engine on the tiny model with its real KV
transport (another engine offered the prompt's blocks through the store's mapped memory: a process
runs one KV transport); mid-fetch, the worker's unpack of the store's push is held by a gate in front of the
real one."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from engine.async_engine import AsyncEngine
from kvtransfer import KVTransport
from kvtransfer.config import TransportConfig
from kvtransfer.receiver import TicketImport
from pdmesh.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.worker.fetch_policy import FetchMode, FetchPolicy, FetchSettings
from services.worker.offers import Offerer
from services.worker.prefix_fetch import PrefixFetcher
from services.worker.shared_memory import SharedMemoryLink
from services.worker.store_client import StoreClient
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion
from tests.services.kvstore.store_process import StoreProcess
from tests.services.worker.test_shared_cancel import mapped_by

pytestmark = pytest.mark.slow
PROMPTS = {
    "cancelled before it began": [(5 * i + 1) % 250 for i in range(42)],  # 10 full blocks of 4
    "cancelled mid-fetch": [(11 * i + 2) % 250 for i in range(42)],
}
LEASE_S = 120.0  # the fetch's lease: without the cancel the request would wait this long


def hold_unpacks(transport: KVTransport) -> tuple[threading.Event, threading.Event]:
    """(entered, opened): the receiver's unpacks wait for `opened`, then run."""
    entered, opened = threading.Event(), threading.Event()
    unpacker = transport.receiver._unpacker
    real = unpacker.unpack

    async def held(*args: Any) -> Any:
        entered.set()
        await asyncio.to_thread(opened.wait, 30)
        return await real(*args)

    unpacker.unpack = held  # type: ignore[method-assign]
    return entered, opened


async def fetch_cancelled(address: str, path: Path, when: str) -> None:
    prompt = PROMPTS[when]
    source, worker = make_engine(path), make_engine(path)
    source.add_request("turn1", prompt, greedy(1))
    expected = run_to_completion(source)["turn1"]
    (chain,) = source.take_finished_chains()
    sources, workers = AsyncEngine(source), AsyncEngine(worker)
    transport = KVTransport(worker.kv_layout, TransportConfig(ucx_tls="tcp,self"), worker.kv_caches).start()
    client = StoreClient(worker.kv_layout, 10, 10)
    client.point_at(address)
    link = SharedMemoryLink(client, source.kv_caches)  # the source offers through it (one transport a process)
    layout = worker.kv_layout
    policy = FetchPolicy(FetchSettings(mode=FetchMode.ALWAYS), layout.bytes_per_token * 4, 4)
    fetcher = PrefixFetcher(workers, transport, client, layout, LEASE_S, policy)
    opened = threading.Event()
    try:
        await mapped_by(link)
        assert await Offerer(sources, transport, client, 1 << 20, link)._offer_run(tuple(chain)) == 10
        if when == "cancelled mid-fetch":
            entered, opened = hold_unpacks(transport)
        imported = await fetcher._fetch_prefix("turn2", prompt, None)  # its task made, not yet begun
        assert isinstance(imported, TicketImport)
        if when == "cancelled mid-fetch":
            assert await asyncio.to_thread(entered.wait, 30), "the store's push never landed"
        await asyncio.wait_for(fetcher.close(), 30)  # what a stopping worker does
        opened.set()  # the unpack under way ends; then the import fails
        started = time.monotonic()
        outs = [o async for o in workers.generate("turn2", prompt, greedy(1), kv_import=imported)]
        assert time.monotonic() - started < LEASE_S / 4  # the cancel ended the import, not its lease
        assert imported.error() is not None and "the fetch was cancelled" in str(imported.error())
        assert [t for o in outs for t in o.new_token_ids] == expected
        assert outs[-1].num_imported_tokens == 0  # computed here
        assert (await workers.stats()).num_free_blocks == worker.pool.num_blocks
        assert len(transport.receiver) == 0  # no ticket left expected
        await until_no_fetch_in_flight(address)  # the store unpinned its blocks
    finally:
        opened.set()
        await fetcher.close()
        await link.close()
        await client.close()
        transport.close()
        sources.shutdown()
        workers.shutdown()


async def until_no_fetch_in_flight(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        for _ in range(300):
            status = await asyncio.to_thread(stub.GetStatus, kvstore_pb2.GetStatusRequest(), timeout=10)
            if status.num_fetches_in_flight == 0:
                return
            await asyncio.sleep(0.1)
    raise AssertionError("the store still has the cancelled fetch in flight")


@pytest.mark.parametrize("when", list(PROMPTS))
def test_a_cancelled_ucx_fetch_fails_its_import_at_once_and_releases_everything(
    store: StoreProcess, tiny_llama: Path, when: str
) -> None:
    asyncio.run(fetch_cancelled(store.address, tiny_llama, when))
