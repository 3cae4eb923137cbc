from pdmesh.v1 import common_pb2 as _common_pb2
from pdmesh.v1 import kvstore_pb2 as _kvstore_pb2
from pdmesh.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecutionPlan(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_PLAN_UNSPECIFIED: _ClassVar[ExecutionPlan]
    EXECUTION_PLAN_DISAGGREGATED: _ClassVar[ExecutionPlan]
    EXECUTION_PLAN_LOCAL_PREFILL: _ClassVar[ExecutionPlan]
EXECUTION_PLAN_UNSPECIFIED: ExecutionPlan
EXECUTION_PLAN_DISAGGREGATED: ExecutionPlan
EXECUTION_PLAN_LOCAL_PREFILL: ExecutionPlan

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "sampling", "slo", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: _common_pb2.Prompt
    sampling: _common_pb2.SamplingParams
    slo: _common_pb2.Slo
    priority: _common_pb2.Priority
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., slo: _Optional[_Union[_common_pb2.Slo, _Mapping]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("plan", "prefill_worker_id", "decode_worker_id", "num_decode_failovers")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    plan: ExecutionPlan
    prefill_worker_id: str
    decode_worker_id: str
    num_decode_failovers: int
    def __init__(self, plan: _Optional[_Union[ExecutionPlan, str]] = ..., prefill_worker_id: _Optional[str] = ..., decode_worker_id: _Optional[str] = ..., num_decode_failovers: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "chunk", "usage", "placement")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk: _common_pb2.TokenChunk
    usage: _common_pb2.Usage
    placement: Placement
    def __init__(self, request_id: _Optional[str] = ..., chunk: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "model_fingerprint", "max_model_len_tokens", "num_prefill_workers", "num_decode_workers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_fingerprint: str
    max_model_len_tokens: int
    num_prefill_workers: int
    num_decode_workers: int
    def __init__(self, name: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., max_model_len_tokens: _Optional[int] = ..., num_prefill_workers: _Optional[int] = ..., num_decode_workers: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetClusterStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerState(_message.Message):
    __slots__ = ("info", "health", "load", "last_report_unix_ms", "num_assigned_requests", "step_model", "transfer_model")
    INFO_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_ASSIGNED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STEP_MODEL_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MODEL_FIELD_NUMBER: _ClassVar[int]
    info: _worker_pb2.WorkerInfo
    health: _worker_pb2.WorkerHealth
    load: _worker_pb2.ReportLoadRequest
    last_report_unix_ms: int
    num_assigned_requests: int
    step_model: _worker_pb2.StepModel
    transfer_model: _worker_pb2.TransferModel
    def __init__(self, info: _Optional[_Union[_worker_pb2.WorkerInfo, _Mapping]] = ..., health: _Optional[_Union[_worker_pb2.WorkerHealth, str]] = ..., load: _Optional[_Union[_worker_pb2.ReportLoadRequest, _Mapping]] = ..., last_report_unix_ms: _Optional[int] = ..., num_assigned_requests: _Optional[int] = ..., step_model: _Optional[_Union[_worker_pb2.StepModel, _Mapping]] = ..., transfer_model: _Optional[_Union[_worker_pb2.TransferModel, _Mapping]] = ...) -> None: ...

class GetClusterStateResponse(_message.Message):
    __slots__ = ("time_unix_ms", "policy", "num_queued_requests", "num_running_requests", "workers", "kv_stores")
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    KV_STORES_FIELD_NUMBER: _ClassVar[int]
    time_unix_ms: int
    policy: str
    num_queued_requests: int
    num_running_requests: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerState]
    kv_stores: _containers.RepeatedCompositeFieldContainer[KVStoreState]
    def __init__(self, time_unix_ms: _Optional[int] = ..., policy: _Optional[str] = ..., num_queued_requests: _Optional[int] = ..., num_running_requests: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerState, _Mapping]]] = ..., kv_stores: _Optional[_Iterable[_Union[KVStoreState, _Mapping]]] = ...) -> None: ...

class KVStoreState(_message.Message):
    __slots__ = ("info", "health", "status", "last_report_unix_ms", "num_indexed_blocks")
    INFO_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_INDEXED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    info: _worker_pb2.KVStoreInfo
    health: _worker_pb2.WorkerHealth
    status: _kvstore_pb2.KVStoreStatus
    last_report_unix_ms: int
    num_indexed_blocks: int
    def __init__(self, info: _Optional[_Union[_worker_pb2.KVStoreInfo, _Mapping]] = ..., health: _Optional[_Union[_worker_pb2.WorkerHealth, str]] = ..., status: _Optional[_Union[_kvstore_pb2.KVStoreStatus, _Mapping]] = ..., last_report_unix_ms: _Optional[int] = ..., num_indexed_blocks: _Optional[int] = ...) -> None: ...
