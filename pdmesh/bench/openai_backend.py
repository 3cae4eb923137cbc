"""Any OpenAI-compatible server: streamed `POST {base_url}/completions` over httpx.

So pdmesh and another server (vLLM, SGLang, pdmesh's own HTTP door) can be measured with the
same load in one session. Prompts go as token ids (the completions API takes a list of ints) or
text; `ignore_eos` is sent as the extension field vLLM and SGLang accept; usage is asked for in
the last chunk (`stream_options.include_usage`), and its completion_tokens is the output count.
A streamed chunk does not say how many tokens it carries, so the usage is also asked for on every
chunk (`continuous_usage_stats`, vLLM's extension, which pdmesh's door and SGLang honour): the
growth of completion_tokens is the chunk's token count, exact even for a token whose text the
server held back. A server that ignores it gets each chunk with text counted as one token, as
vLLM's own benchmark counts them, and the last usage corrects the total.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from pdmesh.bench.backend import Backend, Delta, GenerationOptions, RequestFailed, ServerInfo
from pdmesh.bench.workload import BenchRequest

_CONNECT_TIMEOUT_S = 10.0


class OpenAIBackend(Backend):
    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No pool limit: httpx's default of 100 connections would cap the concurrency it measures.
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(None, connect=_CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )  # fmt: skip
        self._model = ""

    async def close(self) -> None:
        await self._http.aclose()

    async def describe(self) -> ServerInfo:
        try:
            response = await self._http.get("/models", timeout=_CONNECT_TIMEOUT_S)
        except httpx.TransportError as e:
            raise RequestFailed("UNAVAILABLE", f"GET {self.base_url}/models: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise RequestFailed(f"HTTP_{response.status_code}", f"GET {self.base_url}/models: {_error_text(response)}")
        models = response.json().get("data") or []
        if not models:
            raise RequestFailed("UNAVAILABLE", f"{self.base_url}/models lists no model")
        first = models[0]
        self._model = str(first.get("id", ""))
        limit = first.get("max_model_len")  # vLLM's extension; others leave it out
        return ServerInfo(model=self._model, max_model_len=int(limit) if limit else None,
                          detail=f"OpenAI API at {self.base_url}")  # fmt: skip

    def request_body(self, request: BenchRequest, options: GenerationOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": options.model or self._model,
            "prompt": request.prompt if isinstance(request.prompt, str) else list(request.prompt),
            "max_tokens": request.output_len, "temperature": options.temperature, "ignore_eos": options.ignore_eos,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }  # fmt: skip
        if options.seed is not None:
            body["seed"] = options.seed + request.index
        return body

    def request_headers(self, options: GenerationOptions) -> dict[str, str]:
        """SLO targets (--send-slo) as the headers llm-d and pdmesh's HTTP door read."""
        headers = {}
        if options.slo_ttft_ms is not None:
            headers["x-slo-ttft-ms"] = f"{options.slo_ttft_ms:g}"
        if options.slo_tpot_ms is not None:
            headers["x-slo-tpot-ms"] = f"{options.slo_tpot_ms:g}"
        return headers

    async def stream(self, request: BenchRequest, options: GenerationOptions) -> AsyncIterator[Delta]:
        body = self.request_body(request, options)
        headers = self.request_headers(options)
        try:
            async with (
                asyncio.timeout(options.timeout_s),
                self._http.stream("POST", "/completions", json=body, headers=headers) as r,
            ):
                if r.status_code != 200:
                    await r.aread()
                    raise RequestFailed(f"HTTP_{r.status_code}", _error_text(r))
                async for delta in _deltas(r):
                    yield delta
        except TimeoutError:
            raise RequestFailed("DEADLINE_EXCEEDED", f"no complete answer within {options.timeout_s} s") from None
        except httpx.TransportError as e:
            raise RequestFailed("UNAVAILABLE", f"{type(e).__name__}: {e}") from None


async def _deltas(response: httpx.Response) -> AsyncIterator[Delta]:
    """Server-sent events -> Deltas; RequestFailed for an error event or a stream cut short."""
    finished = False
    counted = 0  # completion_tokens as of the previous chunk, when the server says
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RequestFailed("STREAM_ERROR", str(event["error"].get("message", event["error"])))
        choices = event.get("choices") or []
        text = choices[0].get("text") or "" if choices else ""
        reason = choices[0].get("finish_reason") if choices else None
        finished = finished or reason is not None
        usage = event.get("usage") or {}
        so_far = usage.get("completion_tokens")
        if choices and so_far is not None:  # continuous usage: the chunk's exact token count
            num_tokens, counted = so_far - counted, so_far
        else:
            num_tokens = 1 if text else 0
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")  # OpenAI's usage, when given
        yield Delta(num_tokens, usage.get("prompt_tokens"), reason, so_far, cached_prompt_tokens=cached)
    if not finished:
        raise RequestFailed("NO_FINISH", "the stream ended without a finish reason")


def _error_text(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped error body, else the body itself (cut short)."""
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return response.text[:300]
