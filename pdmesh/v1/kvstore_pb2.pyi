from pdmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("kv_layout", "block_hashes")
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    kv_layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("generations", "arena_id")
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedScalarFieldContainer[int]
    arena_id: int
    def __init__(self, generations: _Optional[_Iterable[int]] = ..., arena_id: _Optional[int] = ...) -> None: ...

class OfferRequest(_message.Message):
    __slots__ = ("kv_layout", "block_hashes", "shared")
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    kv_layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    shared: SharedMemory
    def __init__(self, kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[int]] = ..., shared: _Optional[_Union[SharedMemory, _Mapping]] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("arena_id", "lease_ms")
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    arena_id: int
    lease_ms: int
    def __init__(self, arena_id: _Optional[int] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class OfferResponse(_message.Message):
    __slots__ = ("wanted", "ticket", "slots", "hold_id")
    WANTED_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    wanted: _containers.RepeatedScalarFieldContainer[int]
    ticket: _common_pb2.KVTicket
    slots: _containers.RepeatedScalarFieldContainer[int]
    hold_id: str
    def __init__(self, wanted: _Optional[_Iterable[int]] = ..., ticket: _Optional[_Union[_common_pb2.KVTicket, _Mapping]] = ..., slots: _Optional[_Iterable[int]] = ..., hold_id: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("kv_layout", "block_hashes", "generations", "ticket", "shared")
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    kv_layout: _common_pb2.KVLayout
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    generations: _containers.RepeatedScalarFieldContainer[int]
    ticket: _common_pb2.KVTicket
    shared: SharedMemory
    def __init__(self, kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Iterable[int]] = ..., generations: _Optional[_Iterable[int]] = ..., ticket: _Optional[_Union[_common_pb2.KVTicket, _Mapping]] = ..., shared: _Optional[_Union[SharedMemory, _Mapping]] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("transfer_bytes", "transfer_ms", "slots", "hold_id")
    TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_bytes: int
    transfer_ms: float
    slots: _containers.RepeatedScalarFieldContainer[int]
    hold_id: str
    def __init__(self, transfer_bytes: _Optional[int] = ..., transfer_ms: _Optional[float] = ..., slots: _Optional[_Iterable[int]] = ..., hold_id: _Optional[str] = ...) -> None: ...

class MapMemoryRequest(_message.Message):
    __slots__ = ("kv_layout",)
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    kv_layout: _common_pb2.KVLayout
    def __init__(self, kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ...) -> None: ...

class MapMemoryResponse(_message.Message):
    __slots__ = ("path", "arena_bytes", "arena_id", "num_slots", "boot_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARENA_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    arena_bytes: int
    arena_id: int
    num_slots: int
    boot_id: str
    def __init__(self, path: _Optional[str] = ..., arena_bytes: _Optional[int] = ..., arena_id: _Optional[int] = ..., num_slots: _Optional[int] = ..., boot_id: _Optional[str] = ...) -> None: ...

class ReleaseFetchRequest(_message.Message):
    __slots__ = ("hold_id",)
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    def __init__(self, hold_id: _Optional[str] = ...) -> None: ...

class ReleaseFetchResponse(_message.Message):
    __slots__ = ("held",)
    HELD_FIELD_NUMBER: _ClassVar[int]
    held: bool
    def __init__(self, held: _Optional[bool] = ...) -> None: ...

class CommitOfferRequest(_message.Message):
    __slots__ = ("hold_id", "written")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    written: bool
    def __init__(self, hold_id: _Optional[str] = ..., written: _Optional[bool] = ...) -> None: ...

class CommitOfferResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStoreStatus(_message.Message):
    __slots__ = ("memory_capacity_bytes", "memory_used_bytes", "disk_capacity_bytes", "disk_used_bytes", "num_namespaces", "num_memory_blocks", "num_disk_blocks", "num_lookups", "num_lookup_blocks", "num_lookup_hit_blocks", "num_fetches", "num_fetched_blocks", "num_fetches_refused", "num_fetches_failed", "num_fetches_in_flight", "num_offers", "num_stored_blocks", "num_demoted_blocks", "num_promoted_blocks", "num_evicted_blocks", "num_restored_blocks", "shared_memory", "num_leases", "num_leases_expired")
    MEMORY_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    NUM_MEMORY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOOKUP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOOKUP_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FETCHES_FIELD_NUMBER: _ClassVar[int]
    NUM_FETCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FETCHES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    NUM_FETCHES_FAILED_FIELD_NUMBER: _ClassVar[int]
    NUM_FETCHES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_OFFERS_FIELD_NUMBER: _ClassVar[int]
    NUM_STORED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_DEMOTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMOTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESTORED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    memory_capacity_bytes: int
    memory_used_bytes: int
    disk_capacity_bytes: int
    disk_used_bytes: int
    num_namespaces: int
    num_memory_blocks: int
    num_disk_blocks: int
    num_lookups: int
    num_lookup_blocks: int
    num_lookup_hit_blocks: int
    num_fetches: int
    num_fetched_blocks: int
    num_fetches_refused: int
    num_fetches_failed: int
    num_fetches_in_flight: int
    num_offers: int
    num_stored_blocks: int
    num_demoted_blocks: int
    num_promoted_blocks: int
    num_evicted_blocks: int
    num_restored_blocks: int
    shared_memory: bool
    num_leases: int
    num_leases_expired: int
    def __init__(self, memory_capacity_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., disk_capacity_bytes: _Optional[int] = ..., disk_used_bytes: _Optional[int] = ..., num_namespaces: _Optional[int] = ..., num_memory_blocks: _Optional[int] = ..., num_disk_blocks: _Optional[int] = ..., num_lookups: _Optional[int] = ..., num_lookup_blocks: _Optional[int] = ..., num_lookup_hit_blocks: _Optional[int] = ..., num_fetches: _Optional[int] = ..., num_fetched_blocks: _Optional[int] = ..., num_fetches_refused: _Optional[int] = ..., num_fetches_failed: _Optional[int] = ..., num_fetches_in_flight: _Optional[int] = ..., num_offers: _Optional[int] = ..., num_stored_blocks: _Optional[int] = ..., num_demoted_blocks: _Optional[int] = ..., num_promoted_blocks: _Optional[int] = ..., num_evicted_blocks: _Optional[int] = ..., num_restored_blocks: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., num_leases: _Optional[int] = ..., num_leases_expired: _Optional[int] = ...) -> None: ...
