"""A worker's calls to the KV store: lookup, offer, fetch; where the store is, and whether to ask it.

The scheduler names the live store in every answer to a load report (`point_at`). The store is an
optimisation, never a dependency: every call is short-timed, and a call that fails or times out
sets the store aside for a while (1 s, doubling to 30 s while it keeps failing), so a dead or
stalled store costs the requests of that moment one timeout, not every request one each. A
success, or a new address, clears it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import structlog

from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from kvtransfer.shm import ArenaInfo
from kvtransfer.ticket import Ticket
from pdmesh.channel import channel
from pdmesh.config import ChannelConfig
from pdmesh.convert import layout_to_pb
from pdmesh.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.worker.convert import ticket_from_pb, ticket_to_pb

log = structlog.get_logger(__name__)
T = TypeVar("T")
Stub = kvstore_pb2_grpc.KVStoreStub
_BACKOFF_S = (1.0, 30.0)


class StoreUnavailable(Exception):
    """The store did not answer, refused, or failed: the caller goes on without it."""


class StaleLookup(StoreUnavailable):
    """The store answered that a block looked up is gone or of another generation (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class Offered:
    wanted: list[int]  # positions of the offered hashes the store wants pushed
    ticket: Ticket | None  # where to push them


@dataclass(frozen=True)
class SharedOffered:
    wanted: list[int]  # positions of the offered hashes the store wants written
    slots: list[int]  # the slot each is written to
    lease_id: str


@dataclass
class StoreCounters:
    """What this worker got from the store: plain attributes, for reports and metrics."""

    lookups: int = 0
    fetches: int = 0
    fetched_blocks: int = 0
    fetch_failures: int = 0
    fetches_skipped: int = 0  # hits computed instead: fetching them was predicted slower (FetchPolicy)
    fetch_skipped_blocks: int = 0
    fetch_probes: int = 0  # small fetches from a store judged slower, to measure it again
    offers: int = 0
    offered_blocks: int = 0
    offer_dropped_blocks: int = 0  # finished blocks never offered: the backlog of offers was full
    errors: int = 0  # calls that failed and set the store aside


class StoreClient:
    def __init__(
        self, layout: KVLayout, lookup_timeout_s: float, offer_timeout_s: float,
        channel_config: ChannelConfig | None = None,
    ) -> None:  # fmt: skip
        self.layout = layout
        self.layout_pb = layout_to_pb(layout)
        self.lookup_timeout_s = lookup_timeout_s
        self.offer_timeout_s = offer_timeout_s
        self.counters = StoreCounters()
        self._channel_config = channel_config
        self.address = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: kvstore_pb2_grpc.KVStoreStub | None = None
        self._aside_until = 0.0
        self._backoff = _BACKOFF_S[0]
        self._retired: list[grpc.aio.Channel] = []
        self.arena_id = 0  # the store's shared arena, as its last lookup named it (0: not shared)

    @property
    def available(self) -> bool:
        return self._stub is not None and time.monotonic() >= self._aside_until

    def point_at(self, address: str) -> None:
        """The store the scheduler names now ("" for none)."""
        if address == self.address:
            return
        log.info("kv store", address=address or None, previous=self.address or None)
        if self._channel is not None:
            self._retired.append(self._channel)  # calls in flight on it finish; closed at close()
        self.address, self._aside_until, self._backoff = address, 0.0, _BACKOFF_S[0]
        self.arena_id = 0
        self._channel = channel(address, self._channel_config) if address else None
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel) if self._channel is not None else None

    async def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Generations of the longest stored prefix of `hashes`."""
        self.counters.lookups += 1
        request = kvstore_pb2.LookupRequest(kv_layout=self.layout_pb, block_hashes=hashes)
        reply = await self._call("lookup", lambda stub: stub.Lookup(request, timeout=self.lookup_timeout_s))
        self.arena_id = reply.arena_id
        return list(reply.generations)

    async def offer(self, hashes: Sequence[BlockHash]) -> Offered:
        self.counters.offers += 1
        request = kvstore_pb2.OfferRequest(kv_layout=self.layout_pb, block_hashes=hashes)
        reply = await self._call("offer", lambda stub: stub.Offer(request, timeout=self.offer_timeout_s))
        return Offered(list(reply.wanted), ticket_from_pb(reply.ticket) if reply.HasField("ticket") else None)

    async def fetch(
        self, hashes: Sequence[BlockHash], generations: Sequence[int], ticket: Ticket, timeout_s: float
    ) -> None:
        """Push the blocks into the ticket; returns once they landed. StoreUnavailable otherwise
        (a stale lookup, FAILED_PRECONDITION, does not set the store aside: it answered)."""
        request = kvstore_pb2.FetchRequest(
            kv_layout=self.layout_pb, block_hashes=hashes, generations=generations, ticket=ticket_to_pb(ticket)
        )
        try:
            await self._call("fetch", lambda stub: stub.Fetch(request, timeout=timeout_s))
        except StoreUnavailable:
            self.counters.fetch_failures += 1
            raise
        self.counters.fetches += 1
        self.counters.fetched_blocks += len(hashes)

    async def map_memory(self) -> ArenaInfo | None:
        """Where the store's memory for this layout is (None: not shared)."""
        request = kvstore_pb2.MapMemoryRequest(kv_layout=self.layout_pb)
        reply = await self._call("map", lambda stub: stub.MapMemory(request, timeout=self.lookup_timeout_s))
        if not reply.path:
            return None
        return ArenaInfo(reply.path, reply.arena_bytes, reply.arena_id, reply.num_slots, reply.boot_id)

    async def fetch_shared(
        self, hashes: Sequence[BlockHash], generations: Sequence[int], arena_id: int, lease_s: float
    ) -> tuple[list[int], str]:
        """Pin the blocks in the store's mapped memory: (their slots, the lease to release)."""
        shared = kvstore_pb2.SharedMemory(arena_id=arena_id, lease_ms=max(1, int(lease_s * 1000)))
        request = kvstore_pb2.FetchRequest(
            kv_layout=self.layout_pb, block_hashes=hashes, generations=generations, shared=shared
        )
        try:
            reply = await self._call("fetch", lambda stub: stub.Fetch(request, timeout=lease_s))
        except StoreUnavailable:
            self.counters.fetch_failures += 1
            raise
        return list(reply.slots), reply.hold_id

    async def release_fetch(self, lease_id: str, num_blocks: int) -> bool:
        """Unpin a shared fetch; whether the store held the blocks until now (False: discard the copy)."""
        request = kvstore_pb2.ReleaseFetchRequest(hold_id=lease_id)
        reply = await self._call("release", lambda stub: stub.ReleaseFetch(request, timeout=self.lookup_timeout_s))
        if reply.held:
            self.counters.fetches += 1
            self.counters.fetched_blocks += num_blocks
        else:
            self.counters.fetch_failures += 1
        return bool(reply.held)

    async def offer_shared(self, hashes: Sequence[BlockHash], arena_id: int, lease_s: float) -> SharedOffered:
        self.counters.offers += 1
        shared = kvstore_pb2.SharedMemory(arena_id=arena_id, lease_ms=max(1, int(lease_s * 1000)))
        request = kvstore_pb2.OfferRequest(kv_layout=self.layout_pb, block_hashes=hashes, shared=shared)
        reply = await self._call("offer", lambda stub: stub.Offer(request, timeout=self.offer_timeout_s))
        return SharedOffered(list(reply.wanted), list(reply.slots), reply.hold_id)

    async def commit_offer(self, lease_id: str, written: bool) -> bool:
        request = kvstore_pb2.CommitOfferRequest(hold_id=lease_id, written=written)
        reply = await self._call("commit", lambda stub: stub.CommitOffer(request, timeout=self.offer_timeout_s))
        return bool(reply.stored)

    async def close(self) -> None:
        for ch in [*self._retired, *([self._channel] if self._channel is not None else [])]:
            await ch.close()

    async def _call(self, method: str, call: Callable[[Stub], Awaitable[T]]) -> T:
        stub = self._stub
        if stub is None or not self.available:
            raise StoreUnavailable("no KV store is available now")
        try:
            reply = await call(stub)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise StaleLookup(f"{method}: {e.code().name}: {e.details()}") from None
            self._set_aside(method, e)
            raise StoreUnavailable(f"{method}: {e.code().name}: {e.details()}") from None
        self._backoff = _BACKOFF_S[0]
        return reply

    def _set_aside(self, method: str, error: grpc.aio.AioRpcError) -> None:
        self.counters.errors += 1
        self._aside_until = time.monotonic() + self._backoff
        log.warning("kv store set aside", method=method, code=error.code().name, for_s=self._backoff)
        self._backoff = min(self._backoff * 2, _BACKOFF_S[1])
