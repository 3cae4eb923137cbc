"""The store's side of its KV transfers: offered blocks land in a namespace's slab, fetched blocks
are pushed out of it, through the same kvtransfer tickets workers use between themselves.

An offer's slots are held until its push lands whole (stored) or fails (given back): the ticket
is committed at once, so its lease only bounds the push, and grows with the bytes offered (a GPU
model's block is megabytes: an offer of 32 of Llama-3.1-8B's is 64 MiB). An offer of a layout
whose memory is still being allocated (memory.py) wants nothing: it is answered at once. A fetch
keeps its blocks pinned until the caller's receiver has every layer, or the push failed; a
cancelled fetch tells the receiver.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
import torch

from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from kvtransfer.errors import TransferFailed
from kvtransfer.sender import KVPush
from kvtransfer.telemetry import TransferStats
from kvtransfer.ticket import Ticket
from kvtransfer.transport import KVTransport
from services.kvstore.namespace import Namespace
from services.kvstore.store import BlockStore
from services.status import StaleBlock

log = structlog.get_logger(__name__)
# The slowest push an offer's lease allows for on top of its base: tcp between hosts under load.
_SLOWEST_PUSH_BYTES_PER_S = 100e6


@dataclass(frozen=True)
class OfferAnswer:
    wanted: list[int]  # positions of the offered hashes the store wants
    ticket: Ticket | None  # where to push them; None when nothing is wanted


@dataclass(frozen=True)
class Fetched:
    bytes: int
    seconds: float  # from the fetch's arrival to the caller's receiver confirming every layer


class StoreTransfers:
    def __init__(self, store: BlockStore, transport: KVTransport, offer_lease_s: float) -> None:
        self.store = store
        self.transport = transport
        self.offer_lease_s = offer_lease_s
        self._landing: set[asyncio.Task[None]] = set()

    async def offer(self, layout: KVLayout, hashes: Sequence[BlockHash]) -> OfferAnswer:
        namespace = self.store.namespace(layout, create=True)
        self.store.counters.offers += 1
        if namespace is None:
            return OfferAnswer([], None)
        wanted, slots = namespace.offer(hashes)
        if not wanted:
            return OfferAnswer([], None)
        blocks = [hashes[i] for i in wanted]
        ticket_id = f"offer-{uuid.uuid4().hex[:16]}"
        lease_s = self.offer_lease_s + len(slots) * namespace.block_bytes / _SLOWEST_PUSH_BYTES_PER_S
        try:
            imported = await self.transport.expect_async(
                ticket_id, slots, len(slots) * layout.block_size, lease_s, caches=namespace.caches
            )
        except BaseException:
            namespace.landed(blocks, slots, ok=False)
            raise
        imported.commit()  # the store owns the slots; the lease now only bounds the push
        task = asyncio.get_running_loop().create_task(self._land(namespace, blocks, slots, imported.future))
        self._landing.add(task)
        task.add_done_callback(self._landing.discard)
        return OfferAnswer(wanted, imported.ticket)

    async def fetch(
        self, layout: KVLayout, hashes: Sequence[BlockHash], generations: Sequence[int], ticket: Ticket
    ) -> Fetched:
        started = time.monotonic()
        namespace = self.store.namespace(layout)
        counters = self.store.counters
        if namespace is None:
            counters.fetches_refused += 1
            raise StaleBlock("kv_layout", "the store holds no block of this KV layout", "look the prefix up again")
        if ticket.num_blocks != len(hashes):
            raise StaleBlock("ticket", f"holds {ticket.num_blocks} blocks for {len(hashes)} hashes", "match them")
        entries, slots = await namespace.start_fetch(hashes, generations)
        try:
            nbytes = await self._push(namespace, ticket, slots)
        except TransferFailed:
            counters.fetches_failed += 1
            raise
        except StaleBlock:
            counters.fetches_refused += 1
            raise
        finally:
            counters.fetches_in_flight -= 1
            namespace.unpin(entries)
        counters.fetches += 1
        counters.fetched_blocks += len(hashes)
        return Fetched(nbytes, time.monotonic() - started)

    async def _push(self, namespace: Namespace, ticket: Ticket, slots: list[int]) -> int:
        push = self.transport.push(ticket, namespace.layout)
        packing = asyncio.ensure_future(asyncio.to_thread(_push_all, push, namespace.caches.tensors, slots, ticket))
        try:
            await asyncio.shield(packing)
            return (await push).bytes
        except BaseException as e:
            push.cancel(f"the store's fetch ended: {type(e).__name__}")
            raise
        finally:
            if not packing.done():  # nothing may read the slots once they are unpinned
                await asyncio.wait({packing})

    async def _land(
        self, namespace: Namespace, blocks: list[BlockHash], slots: list[int],
        landing: concurrent.futures.Future[TransferStats],
    ) -> None:  # fmt: skip
        try:
            await asyncio.wrap_future(landing)
            ok = True
        except Exception as e:  # the worker's push failed or outlived the lease: nothing is stored
            log.info("offer did not land", blocks=len(blocks), reason=str(e))
            ok = False
        namespace.landed(blocks, slots, ok)

    async def close(self) -> None:
        for task in list(self._landing):
            task.cancel()
        await asyncio.gather(*self._landing, return_exceptions=True)


def _push_all(push: KVPush, tensors: Sequence[torch.Tensor], slots: list[int], ticket: Ticket) -> None:
    """Every layer of the slots, in order, into the push (packs on this thread)."""
    for layer, kv in enumerate(tensors):
        push.push_layer(layer, kv, slots, ticket.num_tokens)
    push.close()
