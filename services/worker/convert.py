"""Protobuf <-> engine types for the worker services: the one place they meet.

Engine types never grow to_pb/from_pb; servicers call these functions and nothing else touches
both worlds.
"""

from __future__ import annotations

from engine.errors import InvalidRequest
from engine.request import FinishReason, RequestOutput
from engine.sampling_params import SamplingParams
from pdmesh.v1 import common_pb2

_FINISH = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


def sampling_from_pb(pb: common_pb2.SamplingParams, *, max_tokens: int | None = None) -> SamplingParams:
    """The engine's SamplingParams; proto3 `optional` fields left unset take the engine defaults."""
    defaults = SamplingParams()
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else (
            pb.max_tokens if pb.HasField("max_tokens") else defaults.max_tokens
        ),
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.HasField("top_p") else defaults.top_p,
        min_p=pb.min_p,
        repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        logprobs=pb.logprobs,
        include_stop_str_in_output=pb.include_stop_str_in_output,
    )  # fmt: skip
    params.validate()
    return params


def token_ids_from_pb(ids: object, field: str) -> list[int]:
    out = list(ids)  # type: ignore[call-overload]
    if field == "prompt_token_ids" and not out:
        raise InvalidRequest(field, "is empty", "send at least one prompt token")
    return out


def chunk_from_output(out: RequestOutput) -> common_pb2.TokenChunk:
    chunk = common_pb2.TokenChunk(token_ids=out.new_token_ids, text=out.text_delta)
    if out.new_logprobs:
        chunk.logprobs.extend(out.new_logprobs)
    if out.finished and out.finish_reason in _FINISH:
        chunk.finish.reason = _FINISH[out.finish_reason]
    return chunk


def usage_of(out: RequestOutput, *, decode_s: float | None = None, prefill_s: float | None = None) -> common_pb2.Usage:
    """What this worker measured of a finished request; the scheduler fills the rest."""
    usage = common_pb2.Usage(
        prompt_tokens=out.num_prompt_tokens,
        completion_tokens=out.num_output_tokens,
        cached_prompt_tokens=out.num_cached_tokens,
    )
    if out.queue_s is not None:
        usage.queue_ms = out.queue_s * 1000
    if decode_s is not None:
        usage.decode_ms = decode_s * 1000
    if prefill_s is not None:
        usage.prefill_ms = prefill_s * 1000
    return usage
