"""The scheduler's clients: AsyncClient (asyncio) and Client (blocking), one API. Each call turns
its arguments into a request (convert.py), sends it with the channel's bearer key, and turns the
answer back into the dataclasses of types.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from pdmesh.channel import call_metadata, channel, sync_channel
from pdmesh.client.convert import chunk_from_pb, cluster_state_from_pb, generate_request, models_from_pb
from pdmesh.client.types import Chunk, ClusterState, Completion, ModelInfo, PromptInput
from pdmesh.config import ChannelConfig, from_env
from pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc


class AsyncClient:
    """asyncio client of the scheduler. Use as `async with AsyncClient(target) as client:`.
    config: TLS files, limits and the bearer key (api_key); None takes them from PDMESH_CHANNEL_*
    (plain text, no key when unset)."""

    def __init__(self, target: str, config: ChannelConfig | None = None) -> None:
        config = config if config is not None else from_env(ChannelConfig, "channel")
        self._channel = channel(target, config)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._metadata = call_metadata(config)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any
    ) -> AsyncIterator[Chunk]:
        """Stream the continuation of `prompt`. options: model, sampling, ttft_ms, tpot_ms,
        priority, request_id (see generate_request) and SamplingParams fields. Leaving the loop
        early cancels the request in the mesh."""
        call = self._stub.Generate(generate_request(prompt, **options), timeout=timeout_s, metadata=self._metadata)
        try:
            async for response in call:
                yield chunk_from_pb(response)
        finally:
            call.cancel()

    async def complete(
        self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any
    ) -> Completion:
        """The whole generation at once."""
        return Completion.collect([c async for c in self.generate(prompt, timeout_s=timeout_s, **options)])

    async def list_models(self, *, timeout_s: float | None = 10.0) -> list[ModelInfo]:
        return models_from_pb(
            await self._stub.ListModels(scheduler_pb2.ListModelsRequest(), timeout=timeout_s, metadata=self._metadata)
        )

    async def cluster_state(self, *, timeout_s: float | None = 10.0) -> ClusterState:
        request = scheduler_pb2.GetClusterStateRequest()
        response = await self._stub.GetClusterState(request, timeout=timeout_s, metadata=self._metadata)
        return cluster_state_from_pb(response)


class Client:
    """Blocking client of the scheduler; the same API as AsyncClient."""

    def __init__(self, target: str, config: ChannelConfig | None = None) -> None:
        config = config if config is not None else from_env(ChannelConfig, "channel")
        self._channel = sync_channel(target, config)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._metadata = call_metadata(config)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any
    ) -> Iterator[Chunk]:
        call = self._stub.Generate(generate_request(prompt, **options), timeout=timeout_s, metadata=self._metadata)
        try:
            for response in call:
                yield chunk_from_pb(response)
        finally:
            call.cancel()

    def complete(self, prompt: PromptInput, *, timeout_s: float | None = None, **options: Any) -> Completion:
        return Completion.collect(self.generate(prompt, timeout_s=timeout_s, **options))

    def list_models(self, *, timeout_s: float | None = 10.0) -> list[ModelInfo]:
        request = scheduler_pb2.ListModelsRequest()
        return models_from_pb(self._stub.ListModels(request, timeout=timeout_s, metadata=self._metadata))

    def cluster_state(self, *, timeout_s: float | None = 10.0) -> ClusterState:
        request = scheduler_pb2.GetClusterStateRequest()
        return cluster_state_from_pb(self._stub.GetClusterState(request, timeout=timeout_s, metadata=self._metadata))
