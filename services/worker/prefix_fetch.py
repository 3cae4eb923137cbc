"""Before a prefill: the prompt's KV from the worker's own prefix cache, then from the KV store; the
engine computes only the rest.

    hashes -> store.Lookup -> engine.reserve_prefix (own cached blocks + blocks for the store's part)
           -> receiver.expect (a ticket, leased for the fetch's time) -> store.Fetch pushes into it
           -> the request runs with the import; the engine computes from where it ends

On the store's host the fetch is a copy out of the store's memory, mapped (shared_fetch.py); the
fetch policy measures that route apart from the store's UCX one (FetchPolicy.route), so each is
judged by its own speed.

The store can only make a request faster, never fail it or make it miss its deadline: a fetch is
made only when it is predicted faster than computing those tokens here (fetch_policy.py: the
store's measured speed against the engine's; the lookup and every fetch are timed for it); the
lookup is short-timed, the fetch's lease is a fraction of the request's time left, and a fetch that fails
or outlives its lease (store refused, died, stalled) fails the import, which the engine answers by
computing those tokens (engine.handoff: prefix imports are optional). What the store contributed
is the output's num_imported_tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Sequence

import structlog

from engine.async_engine import AsyncEngine
from engine.block_hash import chain_hashes
from engine.handoff import KVExportSink
from engine.kv_layout import KVLayout
from engine.request import RequestOutput
from engine.reservations import PrefixReservation
from engine.sampling_params import SamplingParams
from kvtransfer.receiver import TicketImport
from kvtransfer.transport import KVTransport
from services.worker.fetch_policy import FetchPlan, FetchPolicy, FetchReason
from services.worker.shared_fetch import SharedFetcher, SharedImport
from services.worker.shared_memory import MappedArena, SharedMemoryLink
from services.worker.store_client import StaleLookup, StoreClient, StoreUnavailable

log = structlog.get_logger(__name__)
_SHARE_OF_TIME_LEFT = 0.25  # the most of a request's remaining time a fetch may take


class PrefixFetcher:
    def __init__(
        self, engine: AsyncEngine, transport: KVTransport, store: StoreClient, layout: KVLayout, fetch_timeout_s: float,
        policy: FetchPolicy, link: SharedMemoryLink | None = None,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.link = link
        self.shared = SharedFetcher(engine, store, link, policy) if link is not None else None
        self.policy = policy
        self.transport = transport
        self.store = store
        self.layout = layout
        self.fetch_timeout_s = fetch_timeout_s
        self._fetches: set[asyncio.Task[None]] = set()

    async def generate(
        self,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        prior_output_ids: Sequence[int] = (),
        kv_export: KVExportSink | None = None,
        prefill_only: bool = False,
        time_left_s: float | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs for the request, started with whatever prefix the store has."""
        imported = await self._fetch_prefix(request_id, [*prompt, *prior_output_ids], time_left_s)
        stream = self.engine.generate(
            request_id, prompt, params, prior_output_ids=prior_output_ids, kv_import=imported,
            kv_export=kv_export, prefill_only=prefill_only, priority=priority,
        )  # fmt: skip
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield out

    async def _fetch_prefix(
        self, request_id: str, tokens: list[int], time_left_s: float | None
    ) -> TicketImport | SharedImport | None:
        """The import of the store's part of the prefix, its fetch under way; None when there is none
        (or fetching it is predicted slower than computing it)."""
        if not self.store.available:
            return None
        bs = self.layout.block_size
        hashes = chain_hashes(tokens[: (len(tokens) - 1) // bs * bs], bs, self.layout.model_fingerprint)
        if not hashes:
            return None
        try:
            started = time.monotonic()
            generations = await self.store.lookup(hashes)
            lookup_ms = (time.monotonic() - started) * 1000
        except StoreUnavailable as e:
            log.info("kv store lookup failed; computing the prompt", request_id=request_id, reason=str(e))
            return None
        mapped = self.link.acquire() if self.link is not None else None  # after the lookup: it names the arena
        address = self.policy.route(self.store.address, shared=mapped is not None)
        self.policy.store(address).lookup_took(lookup_ms)
        imported = None
        try:
            if generations:
                imported = await self._fetch_via(request_id, tokens, hashes, generations, address, time_left_s, mapped)
            return imported
        finally:
            if mapped is not None and self.link is not None and not isinstance(imported, SharedImport):
                self.link.release(mapped)  # else the shared fetch has it, and releases it

    async def _fetch_via(
        self, request_id: str, tokens: list[int], hashes: list, generations: list[int], address: str,
        time_left_s: float | None, mapped: MappedArena | None,
    ) -> TicketImport | SharedImport | None:  # fmt: skip
        """_fetch_prefix through the mapped memory when there is one, else UCX."""
        bs = self.layout.block_size
        timeout_s = self.fetch_timeout_s
        if time_left_s is not None:
            timeout_s = min(timeout_s, max(0.05, time_left_s * _SHARE_OF_TIME_LEFT))
        held = await self._reserve(request_id, tokens, len(generations), address, timeout_s)
        if held is None:
            return None
        first = held.num_cached_tokens // bs
        last = first + len(held.block_ids)
        if mapped is not None and self.shared is not None:
            shared = SharedImport()
            self._track(self.shared.start(request_id, shared, mapped, list(held.block_ids), hashes[first:last],
                                          generations[first:last], address, timeout_s))  # fmt: skip
            return shared
        try:
            imported = await self.transport.expect_async(
                f"{request_id}/kvstore", held.block_ids, held.num_import_tokens, timeout_s
            )
        except BaseException:
            await self.engine.abort(request_id)
            raise
        imported.commit()  # the engine owns the blocks; the lease now bounds the fetch alone
        fetch = self._fetch(imported, address, hashes[first:last], generations[first:last], timeout_s)
        task = asyncio.get_running_loop().create_task(fetch)
        task.add_done_callback(lambda done: _fail_if_cancelled(done, imported))
        self._track(task)
        return imported

    async def _reserve(
        self, request_id: str, tokens: list[int], num_stored: int, address: str, timeout_s: float
    ) -> PrefixReservation | None:
        """Hold the request's cached blocks and blocks for as much of the store's part as pays to
        fetch (FetchPolicy); None, holding nothing, when none does. The whole stored prefix judged
        slower than computing it is skipped before asking the engine anything: a call to the
        engine waits for its step to end, which on a busy GPU is most of what skipping saves."""
        bs = self.layout.block_size
        whole = self.policy.plan(address, num_stored, 0, timeout_s * 1000)
        if whole.reason is FetchReason.SLOWER:
            self._record(request_id, whole, num_stored)
            return None
        held = await self.engine.call(lambda e: e.reserve_prefix(request_id, tokens, num_stored * bs))
        if held.num_import_tokens == 0:
            return None  # the engine's own cache has as much, or there is no room
        offered = len(held.block_ids)
        plan = self.policy.plan(address, offered, held.num_cached_tokens, timeout_s * 1000)
        self._record(request_id, plan, offered)
        if plan.num_blocks == offered:
            return held
        await self.engine.abort(request_id)  # releases the reservation
        if plan.num_blocks == 0:
            return None
        upto = held.num_cached_tokens + plan.num_blocks * bs
        held = await self.engine.call(lambda e: e.reserve_prefix(request_id, tokens, upto))
        return held if held.num_import_tokens else None

    def _record(self, request_id: str, plan: FetchPlan, offered: int) -> None:
        counters = self.store.counters
        if plan.reason is FetchReason.SLOWER:
            counters.fetches_skipped += 1
            counters.fetch_skipped_blocks += offered
        elif plan.reason is FetchReason.PROBE:
            counters.fetch_probes += 1
        if plan.num_blocks < offered:
            log.info(
                "kv store hit partly or wholly computed instead", request_id=request_id, blocks=offered,
                fetching=plan.num_blocks, reason=plan.reason.value, fetch_ms=_ms(plan.fetch_ms),
                compute_ms=_ms(plan.compute_ms),
            )  # fmt: skip

    def _track(self, task: asyncio.Task[None]) -> None:
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch(
        self, imported: TicketImport, address: str, hashes: list, generations: list[int], timeout_s: float
    ) -> None:
        started = time.monotonic()
        try:
            await self.store.fetch(hashes, generations, imported.ticket, timeout_s)
        except StoreUnavailable as e:  # the engine computes these tokens instead
            log.info("kv store fetch failed; computing the prefix", ticket=imported.ticket_id, reason=str(e))
            await imported.cancel_async(str(e))
            if not isinstance(e, StaleLookup):  # a stale lookup is answered at once: no measure of speed
                self.policy.fetch_took(address, len(hashes), (time.monotonic() - started) * 1000, landed=False)
            return
        self.policy.fetch_took(address, len(hashes), (time.monotonic() - started) * 1000, landed=True)

    async def close(self) -> None:
        for task in list(self._fetches):
            task.cancel()
        await asyncio.gather(*self._fetches, return_exceptions=True)


def _fail_if_cancelled(task: asyncio.Task[None], imported: TicketImport) -> None:
    """A UCX fetch cancelled (the worker stopping), before its task began or mid-fetch, fails its
    import now, not when its lease runs out: the request stops waiting and the engine takes its
    blocks back. The store's side ends with the Fetch call, cancelled with the task."""
    if task.cancelled():
        imported.cancel_soon("the fetch was cancelled")


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
