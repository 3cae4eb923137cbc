"""A Decode servicer for exercising the server plumbing: its request_id picks what it does.

Reserve answers a ticket, or raises the error named by request_id; Generate streams one chunk
first and then raises the same error mid-stream, or, for "slow-N", streams N chunks 50 ms apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from engine.errors import InvalidRequest, ModelLoadError, OutOfBlocks, RequestNotFound
from pdmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.bootstrap import ServicerBinding
from services.status import LeaseExpired, NoCapacity, NoLiveWorker, TicketNotFound


class TransferFailed(Exception):
    """Stands in for kvtransfer's error, which the status table matches by package and name."""


TransferFailed.__module__ = "kvtransfer.errors"

ERRORS: dict[str, Callable[[], Exception]] = {
    "invalid": lambda: InvalidRequest("num_tokens", "is 0", "reserve at least 1 token"),
    "out-of-blocks": lambda: OutOfBlocks("num_blocks: needs 9 blocks, 2 are free; retry later"),
    "request-not-found": lambda: RequestNotFound("request_id: r1 is not running"),
    "model-load": lambda: ModelLoadError("/models/x", "has no config.json", "point at a model directory"),
    "ticket-not-found": lambda: TicketNotFound("ticket_id", "t1 is not held here", "reserve a new ticket"),
    "lease-expired": lambda: LeaseExpired(
        "ticket_id", "t1's lease ran out", "reserve again with a longer lease_ms"
    ),
    "no-capacity": lambda: NoCapacity("slo.ttft_ms", "no plan meets 5 ms", "relax the target"),
    "no-live-worker": lambda: NoLiveWorker("model", "no decode worker serves m", "start one"),
    "transfer-failed": lambda: TransferFailed("kv_transfer_address: peer 10.0.0.1:1 hung up"),
    "bug": lambda: RuntimeError("secret internal detail at 0xdeadbeef"),
}


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    async def Reserve(
        self, request: decode_pb2.ReserveRequest, context: object
    ) -> decode_pb2.ReserveResponse:
        if request.request_id in ERRORS:
            raise ERRORS[request.request_id]()
        return decode_pb2.ReserveResponse(ticket=common_pb2.KVTicket(ticket_id="t-" + request.request_id[:8]))

    async def Generate(
        self, request: decode_pb2.DecodeGenerateRequest, context: object
    ) -> AsyncIterator[decode_pb2.DecodeGenerateResponse]:
        count = int(request.request_id.removeprefix("slow-")) if request.request_id.startswith("slow-") else 1
        for i in range(count):
            if i:
                await asyncio.sleep(0.05)
            yield decode_pb2.DecodeGenerateResponse(chunk=common_pb2.TokenChunk(token_ids=[i], text=f"t{i} "))
        if request.request_id in ERRORS:
            raise ERRORS[request.request_id]()

    async def Release(
        self, request: decode_pb2.ReleaseRequest, context: object
    ) -> decode_pb2.ReleaseResponse:
        return decode_pb2.ReleaseResponse(released=True)


def binding() -> ServicerBinding:
    return ServicerBinding(
        FakeDecode(),
        decode_pb2_grpc.add_DecodeServicer_to_server,
        decode_pb2.DESCRIPTOR.services_by_name["Decode"],
    )
