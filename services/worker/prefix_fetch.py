"""Before a prefill: the prompt's KV from the worker's own prefix cache, then from the KV store; the
engine computes only the rest.

    hashes -> store.Lookup -> engine.reserve_prefix (own cached blocks + blocks for the store's part)
           -> receiver.expect (a ticket, leased for the fetch's time) -> store.Fetch pushes into it
           -> the request runs with the import; the engine computes from where it ends

The store can only make a request faster, never fail it or make it miss its deadline: the lookup
is short-timed, the fetch's lease is a fraction of the request's time left, and a fetch that fails
or outlives its lease (store refused, died, stalled) fails the import, which the engine answers by
computing those tokens (engine.handoff: prefix imports are optional). What the store contributed
is the output's num_imported_tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

import structlog

from engine.async_engine import AsyncEngine
from engine.block_hash import chain_hashes
from engine.handoff import KVExportSink
from engine.kv_layout import KVLayout
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from kvtransfer.receiver import TicketImport
from kvtransfer.transport import KVTransport
from services.worker.store_client import StoreClient, StoreUnavailable

log = structlog.get_logger(__name__)
_SHARE_OF_TIME_LEFT = 0.25  # the most of a request's remaining time a fetch may take


class PrefixFetcher:
    def __init__(
        self, engine: AsyncEngine, transport: KVTransport, store: StoreClient, layout: KVLayout, fetch_timeout_s: float
    ) -> None:
        self.engine = engine
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

    async def _fetch_prefix(self, request_id: str, tokens: list[int], time_left_s: float | None) -> TicketImport | None:
        """The import of the store's part of the prefix, its fetch under way; None when there is none."""
        if not self.store.available:
            return None
        bs = self.layout.block_size
        hashes = chain_hashes(tokens[: (len(tokens) - 1) // bs * bs], bs, self.layout.model_fingerprint)
        if not hashes:
            return None
        try:
            generations = await self.store.lookup(hashes)
        except StoreUnavailable as e:
            log.info("kv store lookup failed; computing the prompt", request_id=request_id, reason=str(e))
            return None
        if not generations:
            return None
        held = await self.engine.call(lambda e: e.reserve_prefix(request_id, tokens, len(generations) * bs))
        if held.num_import_tokens == 0:
            return None  # the engine's own cache has as much, or there is no room
        first = held.num_cached_tokens // bs
        timeout_s = self.fetch_timeout_s
        if time_left_s is not None:
            timeout_s = min(timeout_s, max(0.05, time_left_s * _SHARE_OF_TIME_LEFT))
        try:
            imported = await self.transport.expect_async(
                f"{request_id}/kvstore", held.block_ids, held.num_import_tokens, timeout_s
            )
        except BaseException:
            await self.engine.abort(request_id)
            raise
        imported.commit()  # the engine owns the blocks; the lease now bounds the fetch alone
        last = first + len(held.block_ids)
        self._start(imported, hashes[first:last], generations[first:last], timeout_s)
        return imported

    def _start(self, imported: TicketImport, hashes: list, generations: list[int], timeout_s: float) -> None:
        task = asyncio.get_running_loop().create_task(self._fetch(imported, hashes, generations, timeout_s))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch(self, imported: TicketImport, hashes: list, generations: list[int], timeout_s: float) -> None:
        try:
            await self.store.fetch(hashes, generations, imported.ticket, timeout_s)
        except StoreUnavailable as e:  # the engine computes these tokens instead
            log.info("kv store fetch failed; computing the prefix", ticket=imported.ticket_id, reason=str(e))
            await imported.cancel_async(str(e))

    async def close(self) -> None:
        for task in list(self._fetches):
            task.cancel()
        await asyncio.gather(*self._fetches, return_exceptions=True)
