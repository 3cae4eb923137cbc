"""The KVStore service: thin. Lookups read the store; offers and fetches go to StoreTransfers (UCX)
or, when the worker maps the store's memory, to SharedTransfers."""

from __future__ import annotations

import grpc

from pdmesh.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore import convert
from services.kvstore.shared import SharedTransfers
from services.kvstore.store import BlockStore
from services.kvstore.transfers import StoreTransfers
from services.worker.convert import ticket_from_pb


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, transfers: StoreTransfers, shared: SharedTransfers) -> None:
        self.store = store
        self.transfers = transfers
        self.shared = shared

    async def Lookup(  # noqa: N802 (gRPC method name)
        self, request: kvstore_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.LookupResponse:
        layout, hashes = convert.layout_of(request.kv_layout), convert.hashes_of(request.block_hashes)
        shared = self.store.shared(layout)
        arena_id = shared.arena_id if shared is not None else 0
        return kvstore_pb2.LookupResponse(generations=self.store.lookup(layout, hashes), arena_id=arena_id)

    async def Offer(  # noqa: N802
        self, request: kvstore_pb2.OfferRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.OfferResponse:
        layout, hashes = convert.layout_of(request.kv_layout), convert.hashes_of(request.block_hashes)
        if request.HasField("shared"):
            arena_id, lease_s = convert.shared_of(request.shared, "shared")
            return convert.shared_offer_to_pb(self.shared.offer(layout, hashes, arena_id, lease_s))
        return convert.offer_to_pb(await self.transfers.offer(layout, hashes))

    async def Fetch(  # noqa: N802
        self, request: kvstore_pb2.FetchRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.FetchResponse:
        layout, hashes = convert.layout_of(request.kv_layout), convert.hashes_of(request.block_hashes)
        generations = convert.generations_of(request)
        if request.WhichOneof("destination") == "shared":
            arena_id, lease_s = convert.shared_of(request.shared, "shared")
            fetch = await self.shared.fetch(layout, hashes, generations, arena_id, lease_s)
            return convert.shared_fetch_to_pb(fetch)
        fetched = await self.transfers.fetch(layout, hashes, generations, ticket_from_pb(request.ticket))
        return kvstore_pb2.FetchResponse(transfer_bytes=fetched.bytes, transfer_ms=fetched.seconds * 1000)

    async def MapMemory(  # noqa: N802
        self, request: kvstore_pb2.MapMemoryRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.MapMemoryResponse:
        return convert.map_to_pb(self.shared.map(convert.layout_of(request.kv_layout)))

    async def ReleaseFetch(  # noqa: N802
        self, request: kvstore_pb2.ReleaseFetchRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.ReleaseFetchResponse:
        return kvstore_pb2.ReleaseFetchResponse(held=self.shared.release(convert.lease_id_of(request.hold_id)))

    async def CommitOffer(  # noqa: N802
        self, request: kvstore_pb2.CommitOfferRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.CommitOfferResponse:
        stored = self.shared.commit(convert.lease_id_of(request.hold_id), request.written)
        return kvstore_pb2.CommitOfferResponse(stored=stored)

    async def GetStatus(  # noqa: N802
        self, request: kvstore_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.KVStoreStatus:
        return convert.status_to_pb(self.store.status())
