"""How a benchmark talks to a server: the Backend contract, and which backend an --api names.

The runner times everything itself; a backend only turns one BenchRequest into the server's
stream of chunks. Backends: `grpc_backend.GrpcBackend` (pdmesh's own door, through the client
library) and `openai_backend.OpenAIBackend` (any OpenAI-compatible HTTP server). Another protocol
is one more subclass: implement `stream` and `describe`, map failures to RequestFailed codes.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdmesh.bench.workload import BenchRequest


class Api(enum.Enum):
    GRPC = "grpc"  # pdmesh's Scheduler.Generate
    OPENAI = "openai"  # /v1/completions of any OpenAI-compatible server, streamed


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
    # The server's count of all output tokens so far, when it says (OpenAI usage): it corrects
    # a count a backend could only estimate from chunks.
    output_tokens: int | None = None
    # Where the prompt's KV came from, when the server's usage says: found cached, and computed.
    cached_prompt_tokens: int | None = None
    computed_prompt_tokens: int | None = None


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


def make_backend(api: Api, target: str, api_key: str | None = None) -> Backend:
    """The backend for `api`; `target` is host:port for gRPC, the base URL for OpenAI."""
    if api is Api.OPENAI:
        from pdmesh.bench.openai_backend import OpenAIBackend

        return OpenAIBackend(target, api_key)
    from pdmesh.bench.grpc_backend import GrpcBackend

    return GrpcBackend(target)
