"""pdmesh's own door: Scheduler.Generate through the client library (pdmesh.client.AsyncClient)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import grpc

from pdmesh.bench.backend import Backend, Delta, GenerationOptions, RequestFailed, ServerInfo
from pdmesh.bench.workload import BenchRequest
from pdmesh.client import AsyncClient, Chunk, FinishReason


class GrpcBackend(Backend):
    """Every chunk carries its token ids, so token counts and timings are exact."""

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
                yield _delta(chunk, reason.value if reason else None)
        except grpc.aio.AioRpcError as e:
            raise RequestFailed(e.code().name, e.details() or "") from None
        finally:
            await chunks.aclose()  # cancels the call now, not when the generator is collected
        if not finished:
            raise RequestFailed("NO_FINISH", "the stream ended without a finish reason")


def _delta(chunk: Chunk, reason: str | None) -> Delta:
    u = chunk.usage
    if u is None:
        return Delta(len(chunk.token_ids), finish_reason=reason)
    return Delta(len(chunk.token_ids), u.prompt_tokens, reason, cached_prompt_tokens=u.cached_prompt_tokens,
                 computed_prompt_tokens=u.computed_prompt_tokens)  # fmt: skip
