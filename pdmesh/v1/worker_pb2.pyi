from pdmesh.v1 import common_pb2 as _common_pb2
from pdmesh.v1 import kvstore_pb2 as _kvstore_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]

class WorkerHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_HEALTH_UNSPECIFIED: _ClassVar[WorkerHealth]
    WORKER_HEALTH_SERVING: _ClassVar[WorkerHealth]
    WORKER_HEALTH_DRAINING: _ClassVar[WorkerHealth]
    WORKER_HEALTH_STALE: _ClassVar[WorkerHealth]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_HEALTH_UNSPECIFIED: WorkerHealth
WORKER_HEALTH_SERVING: WorkerHealth
WORKER_HEALTH_DRAINING: WorkerHealth
WORKER_HEALTH_STALE: WorkerHealth

class WorkerCapacity(_message.Message):
    __slots__ = ("num_kv_blocks_total", "max_num_running_requests", "max_num_batched_tokens", "max_model_len_tokens")
    NUM_KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_kv_blocks_total: int
    max_num_running_requests: int
    max_num_batched_tokens: int
    max_model_len_tokens: int
    def __init__(self, num_kv_blocks_total: _Optional[int] = ..., max_num_running_requests: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_model_len_tokens: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "kv_transfer_address", "model", "kv_layout", "capacity", "device", "version", "device_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    kv_transfer_address: str
    model: str
    kv_layout: _common_pb2.KVLayout
    capacity: WorkerCapacity
    device: str
    version: str
    device_id: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., kv_transfer_address: _Optional[str] = ..., model: _Optional[str] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., capacity: _Optional[_Union[WorkerCapacity, _Mapping]] = ..., device: _Optional[str] = ..., version: _Optional[str] = ..., device_id: _Optional[str] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("report_interval_ms", "kv_store_address")
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    report_interval_ms: int
    kv_store_address: str
    def __init__(self, report_interval_ms: _Optional[int] = ..., kv_store_address: _Optional[str] = ...) -> None: ...

class StepSample(_message.Message):
    __slots__ = ("num_prefill_tokens", "num_prefill_attention_pairs", "num_decode_requests", "num_decode_context_tokens", "duration_ms")
    NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_ATTENTION_PAIRS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    num_prefill_tokens: int
    num_prefill_attention_pairs: int
    num_decode_requests: int
    num_decode_context_tokens: int
    duration_ms: float
    def __init__(self, num_prefill_tokens: _Optional[int] = ..., num_prefill_attention_pairs: _Optional[int] = ..., num_decode_requests: _Optional[int] = ..., num_decode_context_tokens: _Optional[int] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class TransferSample(_message.Message):
    __slots__ = ("num_bytes", "exposed_ms")
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_MS_FIELD_NUMBER: _ClassVar[int]
    num_bytes: int
    exposed_ms: float
    def __init__(self, num_bytes: _Optional[int] = ..., exposed_ms: _Optional[float] = ...) -> None: ...

class StepModel(_message.Message):
    __slots__ = ("fixed_ms", "per_prefill_token_ms", "per_attention_pair_ms", "per_decode_request_ms", "per_decode_context_token_ms", "num_samples", "rms_relative_error")
    FIXED_MS_FIELD_NUMBER: _ClassVar[int]
    PER_PREFILL_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    PER_ATTENTION_PAIR_MS_FIELD_NUMBER: _ClassVar[int]
    PER_DECODE_REQUEST_MS_FIELD_NUMBER: _ClassVar[int]
    PER_DECODE_CONTEXT_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RMS_RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    fixed_ms: float
    per_prefill_token_ms: float
    per_attention_pair_ms: float
    per_decode_request_ms: float
    per_decode_context_token_ms: float
    num_samples: int
    rms_relative_error: float
    def __init__(self, fixed_ms: _Optional[float] = ..., per_prefill_token_ms: _Optional[float] = ..., per_attention_pair_ms: _Optional[float] = ..., per_decode_request_ms: _Optional[float] = ..., per_decode_context_token_ms: _Optional[float] = ..., num_samples: _Optional[int] = ..., rms_relative_error: _Optional[float] = ...) -> None: ...

class TransferModel(_message.Message):
    __slots__ = ("fixed_ms", "per_mib_ms", "num_samples")
    FIXED_MS_FIELD_NUMBER: _ClassVar[int]
    PER_MIB_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    fixed_ms: float
    per_mib_ms: float
    num_samples: int
    def __init__(self, fixed_ms: _Optional[float] = ..., per_mib_ms: _Optional[float] = ..., num_samples: _Optional[int] = ...) -> None: ...

class KVCacheEvents(_message.Message):
    __slots__ = ("is_snapshot", "block_hashes_stored", "block_hashes_removed")
    IS_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_STORED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    is_snapshot: bool
    block_hashes_stored: _containers.RepeatedScalarFieldContainer[int]
    block_hashes_removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, is_snapshot: _Optional[bool] = ..., block_hashes_stored: _Optional[_Iterable[int]] = ..., block_hashes_removed: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportLoadRequest(_message.Message):
    __slots__ = ("worker_id", "report_seq", "time_unix_ms", "health", "num_kv_blocks_free", "num_kv_blocks_total", "num_running_requests", "num_waiting_requests", "num_kv_reservations", "num_kv_transfers_in_flight", "step_samples", "push_samples", "kv_cache_events")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_TRANSFERS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    STEP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PUSH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    report_seq: int
    time_unix_ms: int
    health: WorkerHealth
    num_kv_blocks_free: int
    num_kv_blocks_total: int
    num_running_requests: int
    num_waiting_requests: int
    num_kv_reservations: int
    num_kv_transfers_in_flight: int
    step_samples: _containers.RepeatedCompositeFieldContainer[StepSample]
    push_samples: _containers.RepeatedCompositeFieldContainer[TransferSample]
    kv_cache_events: KVCacheEvents
    def __init__(self, worker_id: _Optional[str] = ..., report_seq: _Optional[int] = ..., time_unix_ms: _Optional[int] = ..., health: _Optional[_Union[WorkerHealth, str]] = ..., num_kv_blocks_free: _Optional[int] = ..., num_kv_blocks_total: _Optional[int] = ..., num_running_requests: _Optional[int] = ..., num_waiting_requests: _Optional[int] = ..., num_kv_reservations: _Optional[int] = ..., num_kv_transfers_in_flight: _Optional[int] = ..., step_samples: _Optional[_Iterable[_Union[StepSample, _Mapping]]] = ..., push_samples: _Optional[_Iterable[_Union[TransferSample, _Mapping]]] = ..., kv_cache_events: _Optional[_Union[KVCacheEvents, _Mapping]] = ...) -> None: ...

class ReportLoadResponse(_message.Message):
    __slots__ = ("reregister", "kv_snapshot_requested", "kv_store_address", "kv_peers")
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    KV_SNAPSHOT_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    KV_STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_PEERS_FIELD_NUMBER: _ClassVar[int]
    reregister: bool
    kv_snapshot_requested: bool
    kv_store_address: str
    kv_peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reregister: _Optional[bool] = ..., kv_snapshot_requested: _Optional[bool] = ..., kv_store_address: _Optional[str] = ..., kv_peers: _Optional[_Iterable[str]] = ...) -> None: ...

class KVStoreInfo(_message.Message):
    __slots__ = ("store_id", "address", "kv_transfer_address", "version")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    address: str
    kv_transfer_address: str
    version: str
    def __init__(self, store_id: _Optional[str] = ..., address: _Optional[str] = ..., kv_transfer_address: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RegisterKVStoreRequest(_message.Message):
    __slots__ = ("store",)
    STORE_FIELD_NUMBER: _ClassVar[int]
    store: KVStoreInfo
    def __init__(self, store: _Optional[_Union[KVStoreInfo, _Mapping]] = ...) -> None: ...

class RegisterKVStoreResponse(_message.Message):
    __slots__ = ("report_interval_ms",)
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    report_interval_ms: int
    def __init__(self, report_interval_ms: _Optional[int] = ...) -> None: ...

class KVStoreEvents(_message.Message):
    __slots__ = ("kv_layout", "events")
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    kv_layout: _common_pb2.KVLayout
    events: KVCacheEvents
    def __init__(self, kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., events: _Optional[_Union[KVCacheEvents, _Mapping]] = ...) -> None: ...

class ReportKVStoreRequest(_message.Message):
    __slots__ = ("store_id", "report_seq", "time_unix_ms", "health", "status", "events")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    report_seq: int
    time_unix_ms: int
    health: WorkerHealth
    status: _kvstore_pb2.KVStoreStatus
    events: _containers.RepeatedCompositeFieldContainer[KVStoreEvents]
    def __init__(self, store_id: _Optional[str] = ..., report_seq: _Optional[int] = ..., time_unix_ms: _Optional[int] = ..., health: _Optional[_Union[WorkerHealth, str]] = ..., status: _Optional[_Union[_kvstore_pb2.KVStoreStatus, _Mapping]] = ..., events: _Optional[_Iterable[_Union[KVStoreEvents, _Mapping]]] = ...) -> None: ...

class ReportKVStoreResponse(_message.Message):
    __slots__ = ("reregister", "kv_snapshot_requested")
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    KV_SNAPSHOT_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    reregister: bool
    kv_snapshot_requested: bool
    def __init__(self, reregister: _Optional[bool] = ..., kv_snapshot_requested: _Optional[bool] = ...) -> None: ...
