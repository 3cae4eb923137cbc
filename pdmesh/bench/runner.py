"""One load point: send a list of requests and time every chunk of every answer.

Closed loop (a concurrency): at most N requests in flight, the next sent as one finishes.
Open loop (arrival times on the requests, from a rate or a trace): each request leaves at its
arrival time, optionally capped at N in flight (then it waits, and its send lag shows it). TTFT
and E2E count from the moment a request is actually sent, as vLLM's benchmark counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from pdmesh.bench.backend import Backend, Delta, GenerationOptions, RequestFailed
from pdmesh.bench.metrics import RequestResult
from pdmesh.bench.workload import BenchRequest

Progress = Callable[[RequestResult], None]


async def run_point(
    backend: Backend,
    requests: list[BenchRequest],
    options: GenerationOptions,
    max_in_flight: int | None = None,
    on_done: Progress | None = None,
) -> list[RequestResult]:
    """Every request's result, in request order; times are from the start of this call."""
    slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
    t0 = time.perf_counter()

    async def one(request: BenchRequest) -> RequestResult:
        if request.arrival_s is not None:
            await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
        async with slots or contextlib.nullcontext():
            result = await measure(backend, request, options, t0)
        if on_done is not None:
            on_done(result)
        return result

    tasks = [asyncio.create_task(one(r)) for r in requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def measure(backend: Backend, request: BenchRequest, options: GenerationOptions, t0: float) -> RequestResult:
    """Send one request and time its chunks. Never raises: a failure is a failed result."""
    start = time.perf_counter()
    result = RequestResult(
        index=request.index, ok=False, prompt_tokens=request.prompt_len,
        scheduled_s=request.arrival_s, start_s=start - t0,
    )  # fmt: skip
    server_count: int | None = None
    try:
        async for delta in backend.stream(request, options):
            result.add_chunk(delta.num_tokens, time.perf_counter() - start)
            _note_server_counts(result, delta)
            if delta.output_tokens is not None:
                server_count = delta.output_tokens
        if server_count is not None and result.ttft_s is not None:
            result.output_tokens = server_count  # the server's count wins over one estimated from chunks
        result.ok = result.ttft_s is not None
        if not result.ok:
            result.code, result.error = "NO_TOKENS", "the stream finished without a single token"
    except RequestFailed as e:
        result.code, result.error = e.code, e.message
    except Exception as e:  # a benchmark reports a client-side failure; it never dies of one
        result.code, result.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
    if not result.ok:
        result.e2e_s = time.perf_counter() - start  # counts in the run's duration, not in E2E figures
    return result


def _note_server_counts(result: RequestResult, delta: Delta) -> None:
    """What the server said besides tokens, as it says it (the last word wins)."""
    if delta.prompt_tokens is not None:
        result.prompt_tokens = delta.prompt_tokens
    if delta.finish_reason is not None:
        result.finish_reason = delta.finish_reason
    if delta.cached_prompt_tokens is not None:
        result.cached_prompt_tokens = delta.cached_prompt_tokens
    if delta.computed_prompt_tokens is not None:
        result.computed_prompt_tokens = delta.computed_prompt_tokens
