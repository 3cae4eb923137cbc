"""Protobuf <-> the scheduler's own types: the one module that reads GenerateRequest fields.

Validation happens here, at the door, with the engine's own rules (SamplingParams.validate) so a
request the scheduler accepts is one every worker accepts.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from engine.errors import InvalidRequest
from engine.tokenizer import Tokenizer
from pdmesh.sampling import sampling_from_pb
from pdmesh.v1 import common_pb2, scheduler_pb2

_ROLES: dict[int, str] = {
    common_pb2.CHAT_ROLE_SYSTEM: "system",
    common_pb2.CHAT_ROLE_USER: "user",
    common_pb2.CHAT_ROLE_ASSISTANT: "assistant",
    common_pb2.CHAT_ROLE_TOOL: "tool",
}
_seeds = random.SystemRandom()


@dataclass(frozen=True)
class ParsedRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams  # what workers get: the seed is always set
    max_tokens: int
    slo: common_pb2.Slo


def parse_generate(request: scheduler_pb2.GenerateRequest, tokenizer: Tokenizer) -> ParsedRequest:
    prompt = prompt_ids(request.prompt, tokenizer)
    params = sampling_from_pb(request.sampling)
    params.validate(tokenizer.vocab_size)
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(request.sampling)
    sampling.max_tokens = params.max_tokens
    if not sampling.HasField("seed"):
        # Drawn here so that any worker continuing this request draws the same tokens.
        sampling.seed = _seeds.getrandbits(63)
    return ParsedRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        sampling=sampling,
        max_tokens=params.max_tokens,
        slo=request.slo,
    )


def prompt_ids(prompt: common_pb2.Prompt, tokenizer: Tokenizer) -> list[int]:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        if not prompt.text:
            raise InvalidRequest("prompt.text", "is empty", "send some text, token ids or chat messages")
        ids = tokenizer.encode(prompt.text, add_special_tokens=True)  # BOS where the model expects one
    elif kind == "token_ids":
        ids = list(prompt.token_ids.ids)
        vocab = tokenizer.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest("prompt.token_ids", f"contains {bad}", f"use ids below the vocabulary size {vocab}")
    elif kind == "chat":
        messages = [{"role": _role(m.role, i), "content": m.content} for i, m in enumerate(prompt.chat.messages)]
        if not messages:
            raise InvalidRequest("prompt.chat", "has no messages", "send at least one message")
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    else:
        raise InvalidRequest("prompt", "is not set", "set one of prompt.text, prompt.token_ids or prompt.chat")
    if not ids:
        raise InvalidRequest("prompt", "has no tokens", "send a non-empty prompt")
    return ids


def _role(role: int, index: int) -> str:
    if role not in _ROLES:
        raise InvalidRequest(f"prompt.chat.messages[{index}].role", "is unset", "use system, user, assistant or tool")
    return _ROLES[role]
