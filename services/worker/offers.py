"""After prefill: the worker's newly computed full blocks go to the KV store, in the background.

A loop takes the hash chains of the requests the engine finished since its last look
(Engine.take_finished_chains) and offers each chain to the store, a bounded run of blocks at a
time; the store answers with the blocks it lacks and a ticket, and the engine pushes those out of
its prefix cache between two steps (Engine.export_blocks), while they are still cached. A run is
bounded in bytes, not blocks: a GPU model's block is megabytes (Llama-3.1-8B's, bf16: 2 MiB), a
small CPU model's about one, and the pack between two steps should cost about the same. Nothing
here is on the way to any request's first token: a request is finished before its blocks are
offered, an offer that fails is dropped (the blocks are only a cache), and when the store is
slow or away the chains waiting beyond the engine's bound are dropped too.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from engine.async_engine import AsyncEngine
from engine.ids import BlockHash
from kvtransfer.errors import TransferFailed
from kvtransfer.transport import KVTransport
from services.worker.store_client import StoreClient, StoreUnavailable

log = structlog.get_logger(__name__)
_INTERVAL_S = 0.05  # how often the loop looks for finished requests
_BYTES_PER_OFFER = 64 << 20  # one offer's run of blocks: bounds the pack done between two steps
_PUSH_TIMEOUT_S = 30.0


class Offerer:
    def __init__(self, engine: AsyncEngine, transport: KVTransport, store: StoreClient) -> None:
        self.engine = engine
        self.transport = transport
        self.store = store
        self.pushed_blocks = 0  # blocks this worker has put in the store
        block_bytes = store.layout.bytes_per_token * store.layout.block_size
        self.blocks_per_offer = max(1, _BYTES_PER_OFFER // block_bytes)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvstore-offers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_INTERVAL_S)
            chains = await self.engine.call(lambda e: e.take_finished_chains())
            for chain in _longest_first(chains):
                if not self.store.available:
                    break  # set aside: these chains are dropped, later ones will be offered
                await self.offer(chain)

    async def offer(self, chain: tuple[BlockHash, ...]) -> int:
        """Offer one chain, a run of blocks at a time; returns the blocks pushed."""
        pushed = 0
        for start in range(0, len(chain), self.blocks_per_offer):
            try:
                pushed += await self._offer_run(chain[start : start + self.blocks_per_offer])
            except (StoreUnavailable, TransferFailed, TimeoutError) as e:
                log.info("offer to the kv store dropped", blocks=len(chain), reason=str(e))
                break
        self.pushed_blocks += pushed
        return pushed

    async def _offer_run(self, hashes: tuple[BlockHash, ...]) -> int:
        offered = await self.store.offer(hashes)
        if offered.ticket is None or not offered.wanted:
            return 0
        wanted = [hashes[i] for i in offered.wanted]
        push = self.transport.push(offered.ticket)
        exported = await self.engine.call(lambda e: e.export_blocks(wanted, push))
        if exported:
            await asyncio.wait_for(asyncio.wrap_future(push.future), _PUSH_TIMEOUT_S)
            self.store.counters.offered_blocks += exported
        return exported


def _longest_first(chains: list[tuple[BlockHash, ...]]) -> list[tuple[BlockHash, ...]]:
    """Each chain once, those that extend another's prefix standing for it: a multi-turn
    conversation's later turn covers the earlier ones."""
    kept: list[tuple[BlockHash, ...]] = []
    for chain in sorted(chains, key=len, reverse=True):
        if not any(k[: len(chain)] == chain for k in kept):
            kept.append(chain)
    return kept
