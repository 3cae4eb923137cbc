"""How a benchmark talks to a server: the Backend contract and pdmesh's gRPC backend.

The runner times everything itself; a backend only turns one BenchRequest into the server's
stream of chunks. Another protocol (OpenAI HTTP) is one more subclass: implement `stream` and
`describe`, map its failures to RequestFailed codes, and add it to BACKENDS.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import cast

import grpc

from pdmesh.bench.workload import BenchRequest
from pdmesh.client import AsyncClient, Chunk, FinishReason


class Api(enum.Enum):
    GRPC = "grpc"


@dataclass(frozen=True)
class GenerationOptions:
    """What every request of a run asks for besides its prompt and length."""

    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int | None = None  # per-request seeds are seed + request index
    slo_ttft_ms: float | None = None  # sent with each request when set
    slo_tpot_ms: float | None = None
    timeout_s: float | None = None
    model: str = ""


@dataclass(frozen=True)
class Delta:
    """One chunk as it arrived. `prompt_tokens` and `finish_reason` are set when the server says."""

    num_tokens: int
    prompt_tokens: int | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_model_len: int | None = None
    detail: str = ""


class RequestFailed(Exception):
    """A request the server refused or broke off. `code` is short and upper-case: a gRPC status
    name (UNAVAILABLE), an HTTP status (HTTP_429), or FINISH_ABORT / NO_FINISH for a stream that
    ended without a normal finish."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Backend(abc.ABC):
    """Contract: `stream` yields one Delta per server chunk as soon as it arrives and raises
    RequestFailed for any failure; a normal end has a last Delta with a finish reason (stop or
    length). Leaving the iteration early must cancel the request on the server. One Backend
    serves many concurrent streams. Use as `async with`."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def describe(self) -> ServerInfo: ...

    @abc.abstractmethod
    def stream(self, request: BenchRequest, options: GenerationOptions) -> AsyncIterator[Delta]: ...


class GrpcBackend(Backend):
    """pdmesh's Scheduler.Generate through the client library (pdmesh.client.AsyncClient)."""

    def __init__(self, target: str) -> None:
        self._client = AsyncClient(target)
        self.target = target

    async def close(self) -> None:
        await self._client.close()

    async def describe(self) -> ServerInfo:
        try:
            models = await self._client.list_models()
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(e.code().name, f"ListModels at {self.target}: {e.details()}") from None
        if not models:
            raise RequestFailed("UNAVAILABLE", f"the mesh at {self.target} serves no model yet")
        m = models[0]
        detail = f"{m.num_prefill_workers} prefill + {m.num_decode_workers} decode workers"
        return ServerInfo(model=m.name, max_model_len=m.max_model_len_tokens or None, detail=detail)

    async def stream(self, request: BenchRequest, options: GenerationOptions) -> AsyncIterator[Delta]:
        prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
        seed = None if options.seed is None else options.seed + request.index
        chunks = cast(AsyncGenerator[Chunk, None], self._client.generate(
            prompt, timeout_s=options.timeout_s, model=options.model, max_tokens=request.output_len,
            ignore_eos=options.ignore_eos, temperature=options.temperature, seed=seed,
            ttft_ms=options.slo_ttft_ms, tpot_ms=options.slo_tpot_ms,
        ))  # fmt: skip
        finished = False
        try:
            async for chunk in chunks:
                reason = chunk.finish_reason
                if reason is FinishReason.ABORT:
                    raise RequestFailed("FINISH_ABORT", "the server ended the stream (finish reason abort)")
                finished = finished or reason is not None
                prompt_tokens = chunk.usage.prompt_tokens if chunk.usage is not None else None
                yield Delta(len(chunk.token_ids), prompt_tokens, reason.value if reason else None)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(e.code().name, e.details() or "") from None
        finally:
            await chunks.aclose()  # cancels the call now, not when the generator is collected
        if not finished:
            raise RequestFailed("NO_FINISH", "the stream ended without a finish reason")


def make_backend(api: Api, target: str) -> Backend:
    if api is Api.GRPC:
        return GrpcBackend(target)
    raise ValueError(f"--api: {api.value} has no backend yet")
