"""The KVStore service: thin. Lookups read the store; offers and fetches go to StoreTransfers."""

from __future__ import annotations

import grpc

from pdmesh.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore import convert
from services.kvstore.store import BlockStore
from services.kvstore.transfers import StoreTransfers
from services.worker.convert import ticket_from_pb


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, transfers: StoreTransfers) -> None:
        self.store = store
        self.transfers = transfers

    async def Lookup(  # noqa: N802 (gRPC method name)
        self, request: kvstore_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.LookupResponse:
        layout, hashes = convert.layout_of(request.kv_layout), convert.hashes_of(request.block_hashes)
        return kvstore_pb2.LookupResponse(generations=self.store.lookup(layout, hashes))

    async def Offer(  # noqa: N802
        self, request: kvstore_pb2.OfferRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.OfferResponse:
        layout, hashes = convert.layout_of(request.kv_layout), convert.hashes_of(request.block_hashes)
        return convert.offer_to_pb(await self.transfers.offer(layout, hashes))

    async def Fetch(  # noqa: N802
        self, request: kvstore_pb2.FetchRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.FetchResponse:
        layout, hashes = convert.layout_of(request.kv_layout), convert.hashes_of(request.block_hashes)
        generations = convert.generations_of(request)
        fetched = await self.transfers.fetch(layout, hashes, generations, ticket_from_pb(request.ticket))
        return kvstore_pb2.FetchResponse(transfer_bytes=fetched.bytes, transfer_ms=fetched.seconds * 1000)

    async def GetStatus(  # noqa: N802
        self, request: kvstore_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> kvstore_pb2.KVStoreStatus:
        return convert.status_to_pb(self.store.status())
