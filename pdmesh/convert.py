"""Protobuf <-> the types every side shares: sampling parameters, KV layouts and the mesh's enums.

Used by the client library and by the convert modules of the services, so a message means the
same everywhere. Proto3 `optional` fields left unset take the engine's defaults, so a
SamplingParams message with nothing set means the same as SamplingParams().
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

from engine.kv_layout import KVLayout
from engine.sampling_params import SamplingParams
from pdmesh.v1 import common_pb2

E = TypeVar("E", bound=enum.Enum)


def sampling_to_pb(sampling: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        seed=sampling.seed,
        stop=sampling.stop,
        stop_token_ids=sampling.stop_token_ids,
        ignore_eos=sampling.ignore_eos,
        logprobs=sampling.logprobs,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
    )


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        max_tokens=pb.max_tokens if pb.HasField("max_tokens") else defaults.max_tokens,
        temperature=pb.temperature,
        top_k=pb.top_k,
        top_p=pb.top_p if pb.HasField("top_p") else defaults.top_p,
        min_p=pb.min_p,
        repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else defaults.repetition_penalty,
        seed=pb.seed if pb.HasField("seed") else None,
        stop=tuple(pb.stop),
        stop_token_ids=tuple(pb.stop_token_ids),
        ignore_eos=pb.ignore_eos,
        logprobs=pb.logprobs,
        include_stop_str_in_output=pb.include_stop_str_in_output,
    )


def layout_from_pb(pb: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        model_fingerprint=pb.model_fingerprint, dtype=pb.dtype, block_size=pb.block_size_tokens,
        num_layers=pb.num_layers, num_kv_heads=pb.num_kv_heads, head_dim=pb.head_dim,
        layout_version=pb.layout_version,
    )  # fmt: skip


def layout_to_pb(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        model_fingerprint=layout.model_fingerprint, dtype=layout.dtype, block_size_tokens=layout.block_size,
        num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
        layout_version=layout.layout_version,
    )  # fmt: skip


def enum_to_pb(member: enum.Enum, pb_enum: Any) -> int:
    """The proto value named like `member` (WorkerRole.DECODE -> WORKER_ROLE_DECODE)."""
    prefix = pb_enum.Name(0).removesuffix("UNSPECIFIED")
    return int(pb_enum.Value(prefix + member.name))


def enum_from_pb(cls: type[E], pb_enum: Any, value: int) -> E | None:
    """The member of `cls` named like the proto value without its prefix; None for UNSPECIFIED or
    a value this side does not know (a newer peer)."""
    if not value:
        return None
    prefix = pb_enum.Name(0).removesuffix("UNSPECIFIED")
    try:
        return cls[pb_enum.Name(value).removeprefix(prefix)]
    except (KeyError, ValueError):
        return None
