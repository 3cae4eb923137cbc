"""The HTTP routes: the OpenAI API under /v1 (bearer keys when configured), /health and /ready.

A generating route hands the reading of its body and headers (convert) to a Generation, which
enters the core through Door.accept and Door.generate, and renders what comes back (render). A
streamed answer waits for the first response before it sends its 200, so a request refused
during placement or queueing still gets its HTTP status (429, 503, 504); an error after that
arrives as an error event in the stream, then `data: [DONE]`. Every error has OpenAI's shape
(errors.py); nothing answers with a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from engine.errors import InvalidRequest
from engine.tokenizer import Tokenizer
from services.auth import ApiKeys
from services.scheduler.door import Door
from services.scheduler.intake import ClientRequest
from services.scheduler.openai_api import convert
from services.scheduler.openai_api.body_limit import BodyLimit, BodyTooLarge
from services.scheduler.openai_api.errors import HttpError, http_error
from services.scheduler.openai_api.generation import ClientGone, Generation, Read, watching_disconnect
from services.scheduler.openai_api.render import ChatRenderer, CompletionRenderer, Renderer, RenderOptions, Reply
from services.scheduler.openai_api.schemas import ChatCompletionRequest, CompletionRequest, StreamOptions
from services.scheduler.request import Response as CoreResponse
from services.status import NoLiveWorker, ServiceError, Unauthenticated

# FastAPI's own OpenTelemetry instrumentation (newer releases turn it on by default) would trace
# every request twice beside pdmesh's spans (services/telemetry, at the Door) and wrap every
# streamed chunk's send: off, where the release has it.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


@dataclass
class HttpDoor:
    """What the routes share: the core's door and the HTTP door's own settings."""

    door: Door
    tokenizer: Tokenizer
    keys: ApiKeys
    request_timeout_s: float | None  # for a request that names no deadline
    max_body_bytes: int
    draining: bool = False  # set when the scheduler stops: no new requests, /ready 503
    generations: set[asyncio.Task[None]] = field(default_factory=set)  # requests running, each its task
    started: int = 0  # unix time, as /v1/models tells it


def build_app(http: HttpDoor) -> FastAPI:
    http.started = http.started or int(time.time())
    app = FastAPI(title="pdmesh", summary="OpenAI-compatible API of a pdmesh scheduler", redoc_url=None,
                  **_NO_TELEMETRY)  # fmt: skip
    app.add_middleware(BodyLimit, max_bytes=http.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_exception)
    for typed in (InvalidRequest, ServiceError):  # raised by a dependency (auth): no traceback
        app.add_exception_handler(typed, _typed_error)
    app.add_exception_handler(Exception, _typed_error)  # a bug: 500 with an error id
    app.include_router(_probes(http))
    app.include_router(_v1(http), prefix="/v1", dependencies=[Depends(_authorize(http.keys))])
    return app


def _v1(http: HttpDoor) -> APIRouter:
    router = APIRouter()

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        read = functools.partial(convert.chat_request, body)
        return await _generate(http, request, read, ChatRenderer, "chatcmpl", body.stream, body.stream_options)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        read = functools.partial(convert.completion_request, body)
        return await _generate(http, request, read, CompletionRenderer, "cmpl", body.stream, body.stream_options)

    @router.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(http)]}

    @router.get("/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != http.door.model:
            return _error_response(HttpError(HTTPStatus.NOT_FOUND, f"model: {model_id!r} is not served here; "
                                             f"use {http.door.model!r}", "model", "model_not_found"))  # fmt: skip
        return JSONResponse(_model_card(http))

    return router


def _probes(http: HttpDoor) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok", "draining": http.draining}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: a request could be served now (a live decode worker, and not draining)."""
        state = http.door.readiness()
        ok = state.ready and not http.draining
        body = {"status": "ready" if ok else "not_ready", "draining": http.draining,
                "prefill_workers": state.num_prefill, "decode_workers": state.num_decode}  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    return router


async def _generate(
    http: HttpDoor, request: Request, read: Callable[[convert.RequestHeaders], ClientRequest],
    renderer: type[Renderer], id_prefix: str, stream: bool, stream_options: StreamOptions | None,
) -> Response:  # fmt: skip
    """Accept, run and answer one generating request: streamed as server-sent events, or whole."""
    if http.draining:
        return _error_response(http_error(NoLiveWorker("server", "is draining", "retry on another scheduler")))

    def read_request() -> Read:
        headers = convert.RequestHeaders.parse(request.headers)
        return read(headers), headers.timeout_s or http.request_timeout_s

    generation = Generation(http.door, read_request, request.headers.items(), http.generations)
    try:
        accepted = await generation.accepted()
    except Exception as exc:
        return _error_response(http_error(exc))
    options = RenderOptions(
        logprobs=accepted.sampling.logprobs, num_prompt_tokens=accepted.num_prompt_tokens,
        include_usage=stream_options is not None and stream_options.include_usage,
        continuous_usage=stream_options is not None and stream_options.continuous_usage_stats,
    )  # fmt: skip
    render = renderer(Reply.of(id_prefix, accepted.request_id, http.door.model), http.tokenizer, options)
    reply_headers = {convert.REQUEST_ID_HEADER: accepted.request_id}
    streaming = False
    try:
        if stream:
            first = await watching_disconnect(request.receive, generation, generation.next())
            streaming = True
            events = _events(generation, first, render)
            return StreamingResponse(events, media_type="text/event-stream", headers=reply_headers)
        responses = await watching_disconnect(request.receive, generation, _all(generation))
        return JSONResponse(render.answer(responses), headers=reply_headers)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
    except Exception as exc:
        return _error_response(http_error(exc))
    finally:
        if not streaming:  # the stream's body owns the generation from here
            generation.cancel()


async def _all(generation: Generation) -> list[CoreResponse]:
    return [response async for response in generation.responses()]


async def _events(generation: Generation, first: CoreResponse | None, render: Renderer) -> AsyncIterator[str]:
    """The answer as server-sent events. A client that disconnects ends this iteration (Starlette
    cancels it), which cancels the generation."""
    try:
        response = first
        while response is not None:
            chunk = render.chunk(response)
            if chunk is not None:
                yield _event(chunk)
            if response.usage is not None and render.options.include_usage:
                yield _event(render.usage_chunk(response.usage))
            response = await generation.next()
    except Exception as exc:  # after the 200: the error travels in the stream, as vLLM sends it
        yield _event(http_error(exc).body)
    finally:
        generation.cancel()
    yield "data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _model_card(http: HttpDoor) -> dict[str, Any]:
    return {"id": http.door.model, "object": "model", "created": http.started, "owned_by": "pdmesh",
            "max_model_len": http.door.registry.max_model_len}  # fmt: skip


def _authorize(keys: ApiKeys) -> Callable[[Request], Awaitable[None]]:
    async def authorize(request: Request) -> None:  # async: FastAPI would run a plain def on a thread
        if not keys.required:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not keys.accepts(key.strip()):
            raise Unauthenticated("authorization", "no valid API key was presented", "send Authorization: Bearer KEY")

    return authorize


def _error_response(error: HttpError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status, headers=error.headers)


async def _invalid_body(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's findings about a body: 400 naming the field (the first one wrong)."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    top = errors[0]["loc"][:2]
    same = [e for e in errors if e["loc"][:2] == top]  # a union's alternatives fail together
    loc = _common_prefix([tuple(e["loc"]) for e in same])
    param = _path(loc[1:]) if len(loc) > 1 else "body"
    if errors[0]["type"] == "json_invalid":
        param, problems = "body", "is not valid JSON"
    else:
        problems = " or ".join(dict.fromkeys(str(e["msg"]) for e in same))
    message = f"{param}: {problems}; fix the field and send it again"
    return _error_response(HttpError(HTTPStatus.BAD_REQUEST, message, param, "invalid_request"))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) and an oversized body."""
    assert isinstance(exc, HTTPException)
    status = HTTPStatus(exc.status_code)
    if isinstance(exc, BodyTooLarge):
        return _error_response(HttpError(status, str(exc.detail), "body", "body_too_large"))
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _error_response(HttpError(status, message, None, status.phrase.lower().replace(" ", "_")))


async def _typed_error(request: Request, exc: Exception) -> JSONResponse:
    return _error_response(http_error(exc))


def _common_prefix(locs: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    prefix = locs[0]
    for loc in locs[1:]:
        n = next((i for i, (a, b) in enumerate(zip(prefix, loc, strict=False)) if a != b), min(len(prefix), len(loc)))
        prefix = prefix[:n]
    return prefix


def _path(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'role') -> messages[0].role"""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
