"""Protobuf <-> the store's own types: the one place KVStore messages are read and written.

Requests are checked here, at the door: a layout with an empty field, a hash list past the limit
or generations that do not pair with their hashes are INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import dataclasses

from engine.block_pool import KVEvents
from engine.errors import InvalidRequest
from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from kvtransfer.shm import ArenaInfo
from pdmesh.convert import layout_from_pb, layout_to_pb
from pdmesh.v1 import common_pb2, kvstore_pb2, worker_pb2
from services.kvstore.shared import SharedFetch, SharedOffer
from services.kvstore.stats import StoreStatus
from services.kvstore.transfers import OfferAnswer
from services.worker.convert import ticket_to_pb

MAX_BLOCKS = 1 << 16  # a million tokens of 16-token blocks in one call
DTYPES = ("float32", "bfloat16", "float16")


def layout_of(pb: common_pb2.KVLayout) -> KVLayout:
    layout = layout_from_pb(pb)
    if not layout.model_fingerprint:
        raise InvalidRequest("kv_layout.model_fingerprint", "is empty", "send the worker's KV layout")
    if layout.dtype not in DTYPES:
        raise InvalidRequest("kv_layout.dtype", f"is {layout.dtype!r}", f"use one of {', '.join(DTYPES)}")
    for name in ("block_size", "num_layers", "num_kv_heads", "head_dim"):
        if getattr(layout, name) < 1:
            raise InvalidRequest(f"kv_layout.{name}", "is 0", "send the worker's KV layout")
    return layout


def hashes_of(pb_hashes: object) -> list[BlockHash]:
    hashes = [BlockHash(h) for h in pb_hashes]  # type: ignore[attr-defined]
    if len(hashes) > MAX_BLOCKS:
        raise InvalidRequest("block_hashes", f"has {len(hashes)} hashes", f"send at most {MAX_BLOCKS} per call")
    return hashes


def generations_of(request: kvstore_pb2.FetchRequest) -> list[int]:
    if len(request.generations) != len(request.block_hashes):
        raise InvalidRequest(
            "generations", f"has {len(request.generations)} entries for {len(request.block_hashes)} hashes",
            "send the generation Lookup returned for each block",
        )  # fmt: skip
    return list(request.generations)


def shared_of(pb: kvstore_pb2.SharedMemory, field: str) -> tuple[int, float]:
    """(arena id, lease in seconds) of a shared-memory fetch or offer."""
    if pb.lease_ms < 1:
        raise InvalidRequest(f"{field}.lease_ms", "is 0", "give the copy a lease, e.g. the fetch's timeout")
    return pb.arena_id, pb.lease_ms / 1000


def lease_id_of(lease_id: str) -> str:
    if not lease_id:
        raise InvalidRequest("hold_id", "is empty", "send the hold_id the fetch or offer answered")
    return lease_id


def map_to_pb(info: ArenaInfo | None) -> kvstore_pb2.MapMemoryResponse:
    if info is None:
        return kvstore_pb2.MapMemoryResponse()
    return kvstore_pb2.MapMemoryResponse(
        path=info.path, arena_bytes=info.arena_bytes, arena_id=info.arena_id, num_slots=info.num_slots,
        boot_id=info.boot_id,
    )  # fmt: skip


def shared_fetch_to_pb(fetch: SharedFetch) -> kvstore_pb2.FetchResponse:
    return kvstore_pb2.FetchResponse(slots=fetch.slots, hold_id=fetch.lease_id)


def shared_offer_to_pb(offer: SharedOffer) -> kvstore_pb2.OfferResponse:
    return kvstore_pb2.OfferResponse(wanted=offer.wanted, slots=offer.slots, hold_id=offer.lease_id)


def offer_to_pb(answer: OfferAnswer) -> kvstore_pb2.OfferResponse:
    response = kvstore_pb2.OfferResponse(wanted=answer.wanted)
    if answer.ticket is not None:
        response.ticket.CopyFrom(ticket_to_pb(answer.ticket))
    return response


def status_to_pb(status: StoreStatus) -> kvstore_pb2.KVStoreStatus:
    counters = {f"num_{name}": value for name, value in dataclasses.asdict(status.counters).items()}
    fields = {f.name: getattr(status, f.name) for f in dataclasses.fields(status) if f.name != "counters"}
    return kvstore_pb2.KVStoreStatus(**fields, **counters)


def events_to_pb(events: list[tuple[KVLayout, KVEvents]]) -> list[worker_pb2.KVStoreEvents]:
    return [
        worker_pb2.KVStoreEvents(
            kv_layout=layout_to_pb(layout),
            events=worker_pb2.KVCacheEvents(
                is_snapshot=e.snapshot, block_hashes_stored=e.stored, block_hashes_removed=e.removed
            ),
        )
        for layout, e in events
    ]
