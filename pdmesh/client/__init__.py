"""The pdmesh client library: talk to the scheduler without touching protobuf.

    async with AsyncClient("localhost:50051") as client:
        async for chunk in client.generate("Tell me a story", max_tokens=32, ttft_ms=500):
            print(chunk.text, end="")

`Client` is the same API, blocking. Prompts are text, token ids, or chat messages; sampling
fields are those of engine.sampling_params.SamplingParams, given as keywords or as one object.
Every protobuf message is converted to or from the small dataclasses of `types` in `convert` and
nowhere else; `clients` holds the two clients. Errors arrive as grpc.RpcError with the status code
and a message naming the field; a refusal (RESOURCE_EXHAUSTED: no plan meets the SLO now) says
when to try again, which `retry_after_s(error)` reads.
"""

from __future__ import annotations

from pdmesh.client.clients import AsyncClient, Client
from pdmesh.client.convert import (
    chunk_from_pb,
    cluster_state_from_pb,
    generate_request,
    models_from_pb,
    prompt_to_pb,
    retry_after_s,
)
from pdmesh.client.types import (
    ChatMessage,
    Chunk,
    ClusterState,
    Completion,
    KVStoreState,
    ModelInfo,
    Placement,
    PromptInput,
    StepFit,
    TransferFit,
    Usage,
    WorkerState,
)
from pdmesh.enums import ExecutionPlan, FinishReason, Priority, WorkerHealth, WorkerRole  # the client API's enums

__all__ = [
    "AsyncClient",
    "ChatMessage",
    "Chunk",
    "Client",
    "ClusterState",
    "Completion",
    "ExecutionPlan",
    "FinishReason",
    "KVStoreState",
    "ModelInfo",
    "Placement",
    "Priority",
    "PromptInput",
    "StepFit",
    "TransferFit",
    "Usage",
    "WorkerHealth",
    "WorkerRole",
    "WorkerState",
    "chunk_from_pb",
    "cluster_state_from_pb",
    "generate_request",
    "models_from_pb",
    "prompt_to_pb",
    "retry_after_s",
]
