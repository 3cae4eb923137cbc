"""A fetch or an offer through the KV store's mapped memory that is cancelled (the worker stops)
while its copy runs on the engine's thread keeps the mapping until that copy is done: on a GPU
worker releasing it at once could unregister and unmap the memory under a copy still queued.
Every other way a fetch ends (cancelled before it began, failed, done) gives its use of the
mapping back too, once: a use never given back keeps the mapping registered for good.

A real store process over gRPC, its /dev/shm arena mapped, a real engine on the tiny model; the
export and the import are held on the engine's thread by a gate in front of the real ones."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from pdmesh.config import COPY_SETTLE_S, STOP_MARGIN_S
from services.worker.fetch_policy import FetchMode, FetchPolicy, FetchSettings
from services.worker.offers import Offerer
from services.worker.prefix_fetch import PrefixFetcher
from services.worker.shared_fetch import SharedFetcher, SharedImport
from services.worker.shared_memory import MappedArena, SharedMemoryLink
from services.worker.store_client import StoreClient
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion
from tests.services.kvstore.store_process import StoreProcess

pytestmark = pytest.mark.slow
PROMPT = [(7 * i + 3) % 250 for i in range(42)]  # 10 full blocks of 4
OTHER = [(t + 1) % 250 for t in PROMPT]
THIRD = [(t + 2) % 250 for t in PROMPT]


class Transport:
    """What an Offerer reads of its worker's transport: no hand-off in flight."""

    num_in_flight = 0


def gate(engine: Engine, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """(entered, opened): engine.<name> waits for `opened` on the engine's thread, then runs."""
    entered, opened = threading.Event(), threading.Event()
    real: Callable[..., Any] = getattr(engine, name)

    def held(*args: Any) -> Any:
        entered.set()
        opened.wait(30)
        return real(*args)

    monkeypatch.setattr(engine, name, held)
    return entered, opened


async def mapped_by(link: SharedMemoryLink) -> MappedArena:
    for _ in range(600):
        mapped = link.acquire()
        if mapped is not None:
            link.release(mapped)
            return mapped
        await asyncio.sleep(0.05)
    raise TimeoutError("the store's memory was never mapped")


async def cancel_mid_copy(
    address: str, path: Path, monkeypatch: pytest.MonkeyPatch, prompt: list[int], command: str,
    start: Callable[[AsyncEngine, StoreClient, SharedMemoryLink, list[Any], MappedArena], Any],
    stuck: bool = False,
) -> None:  # fmt: skip
    engine = make_engine(path)
    engine.add_request("turn1", prompt, greedy(1))
    run_to_completion(engine)
    (chain,) = engine.take_finished_chains()
    async_engine = AsyncEngine(engine)
    client = StoreClient(engine.kv_layout, 10, 10)
    client.point_at(address)
    link = SharedMemoryLink(client, engine.kv_caches)
    try:
        opened = threading.Event()
        mapped = await mapped_by(link)
        entered, opened = gate(engine, command, monkeypatch)
        task = asyncio.ensure_future(start(async_engine, client, link, list(chain), mapped))
        assert await asyncio.to_thread(entered.wait, 30), f"{command} never ran"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)  # at once: nothing waits for the copy on the event loop
        assert mapped.users == 1  # still the copy's, running on the engine's thread
        link.forget()  # the worker stops: the mapping retires once its last user is done
        assert mapped.retired and mapped.users == 1
        if stuck:  # the copy never ends while the worker stops: the stop waits COPY_SETTLE_S, no more
            started = time.monotonic()
            with capture_logs() as logs:
                await asyncio.wait_for(link.close(), STOP_MARGIN_S)
            # A timed wait may return a hair early (its clock's resolution): 0.1 s of slack below.
            assert COPY_SETTLE_S - 0.1 <= time.monotonic() - started < STOP_MARGIN_S
            assert mapped.users == 1 and mapped.retired  # never released under a copy that may run
            (warning,) = [e for e in logs if e["log_level"] == "warning"]
            assert "did not end in time; the mapping stays" in warning["event"]
            assert warning["waited_s"] == COPY_SETTLE_S
        opened.set()
        await asyncio.wait_for(link.close(), 30)  # waits for the cancelled copy
        assert mapped.users == (1 if stuck else 0)
    finally:
        opened.set()
        await link.close()
        await client.close()
        async_engine.shutdown()


def test_a_cancelled_offer_keeps_the_mapping_until_its_export_has_run(
    store: StoreProcess, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def offer(engine: AsyncEngine, client: StoreClient, link: SharedMemoryLink, chain: list[Any], _: Any) -> int:
        offerer = Offerer(engine, Transport(), client, 1 << 20, link)  # type: ignore[arg-type]
        return await offerer._offer_run(tuple(chain))

    asyncio.run(cancel_mid_copy(store.address, tiny_llama, monkeypatch, PROMPT, "export_blocks", offer))


@pytest.mark.parametrize("stuck", [False, True], ids=["copy ends", "copy stuck"])
def test_a_cancelled_fetch_keeps_the_mapping_until_its_import_has_run(
    store: StoreProcess, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, stuck: bool
) -> None:
    async def fetch(
        engine: AsyncEngine, client: StoreClient, link: SharedMemoryLink, chain: list[Any], mapped: MappedArena
    ) -> None:
        offerer = Offerer(engine, Transport(), client, 1 << 20, link)  # type: ignore[arg-type]
        await offerer._offer_run(tuple(chain))  # unless the store holds the chain already
        generations = await client.lookup(chain)
        assert len(generations) == len(chain)
        # (a cancelled offer's blocks stay leased in the store: the other test offers PROMPT)
        held = await engine.call(lambda e: e.reserve_prefix("turn2", PROMPT, num_tokens=40))
        fetcher = SharedFetcher(engine, client, link, None)  # type: ignore[arg-type]
        link.acquire()  # the fetch's, released by it
        await fetcher.fetch(
            "turn2", SharedImport(), mapped, list(held.block_ids), chain, generations, "mapped", 10
        )  # fmt: skip

    asyncio.run(cancel_mid_copy(store.address, tiny_llama, monkeypatch, OTHER, "import_blocks", fetch, stuck))


async def fetch_ends(address: str, path: Path, end: str) -> None:
    """A worker's fetch of THIRD's 10 blocks (another engine computed and offered them) through the
    mapped memory, as a prefix fetch starts it, then ended `end`'s way."""
    source, worker = make_engine(path), make_engine(path)
    source.add_request("turn1", THIRD, greedy(1))
    expected = run_to_completion(source)["turn1"]
    (chain,) = source.take_finished_chains()
    sources, workers = AsyncEngine(source), AsyncEngine(worker)
    client = StoreClient(worker.kv_layout, 10, 10)
    client.point_at(address)
    link = SharedMemoryLink(client, worker.kv_caches)
    layout = worker.kv_layout
    policy = FetchPolicy(FetchSettings(mode=FetchMode.ALWAYS), layout.bytes_per_token * 4, 4)
    fetcher = PrefixFetcher(workers, None, client, layout, 10, policy, link)  # type: ignore[arg-type]
    try:
        mapped = await mapped_by(link)
        await Offerer(sources, Transport(), client, 1 << 20, link)._offer_run(tuple(chain))  # type: ignore[arg-type]
        imported = await fetcher._fetch_prefix("turn2", THIRD, None)  # its task made, not yet begun
        assert isinstance(imported, SharedImport) and mapped.users == 1
        if end == "cancelled before it began":
            await fetcher.close()  # what a stopping worker does
            await workers.abort("turn2")  # the reservation (the request was never added)
        elif end == "failed":  # the reservation is gone before the copy: the import fails
            await asyncio.wrap_future(workers.submit(lambda e: e.abort("turn2")))
            await asyncio.wait_for(asyncio.gather(*fetcher._fetches), 30)
        else:
            outs = [o async for o in workers.generate("turn2", THIRD, greedy(1), kv_import=imported)]
            assert [t for o in outs for t in o.new_token_ids] == expected
            assert outs[-1].num_imported_tokens == 40
            await asyncio.wait_for(asyncio.gather(*fetcher._fetches), 30)
        assert mapped.users == 0  # given back, and once
        assert imported.done() is (end == "done") and (imported.error() is None) is (end == "done")
        assert (await workers.stats()).num_free_blocks == worker.pool.num_blocks
    finally:
        await fetcher.close()
        await link.close()
        await client.close()
        sources.shutdown()
        workers.shutdown()


@pytest.mark.parametrize("end", ["cancelled before it began", "failed", "done"])
def test_every_end_of_a_shared_fetch_gives_its_use_of_the_mapping_back_once(
    store: StoreProcess, tiny_llama: Path, end: str
) -> None:
    asyncio.run(fetch_ends(store.address, tiny_llama, end))
