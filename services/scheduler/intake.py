"""The one check of a client's request, whichever door it came through.

Both doors — gRPC (convert.py) and the OpenAI HTTP API (openai_api/convert.py) — turn their wire
format into a ClientRequest and hand it to `accept`, which tokenizes (chat template as the model
ships it), validates with the engine's own rules (SamplingParams.validate) and draws the seed. So
a request one door accepts, the other accepts too, and both refuse with the same words. Each door
names its prompt fields as its own wire does (`prompt.chat` on gRPC, `messages` over HTTP): a
prompt carries the name of the field it came in.
"""

from __future__ import annotations

import dataclasses
import math
import random
import uuid
from dataclasses import dataclass

from engine.errors import InvalidRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from pdmesh.enums import Priority
from services.scheduler.request import SchedulerRequest, Slo

_seeds = random.SystemRandom()


@dataclass(frozen=True)
class TextPrompt:
    """Plain text; tokenized with the model's special tokens (BOS where it expects one)."""

    text: str
    field: str = "prompt"


@dataclass(frozen=True)
class TokenPrompt:
    """Token ids of the served model's vocabulary, used as they are."""

    ids: tuple[int, ...]
    field: str = "prompt"


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user, assistant or tool: each door checks its own wire's roles
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation, rendered through the model's chat template with the generation prompt."""

    messages: tuple[ChatMessage, ...]
    field: str = "messages"


Prompt = TextPrompt | TokenPrompt | ChatPrompt


@dataclass(frozen=True)
class ClientRequest:
    """What a client asked for, as either door read it, before any check."""

    prompt: Prompt
    sampling: SamplingParams
    model: str = ""  # empty: the served model
    request_id: str = ""  # empty: one is drawn
    slo: Slo = Slo()
    priority: Priority = Priority.NORMAL
    # The client named no max_tokens and its API means "up to the context window" by that (the
    # OpenAI API): the door sets it from what the prompt leaves. gRPC's default is a number.
    max_tokens_unset: bool = False


def accept(request: ClientRequest, tokenizer: Tokenizer, max_prompt_bytes: int) -> SchedulerRequest:
    """The request as the core works on it; InvalidRequest naming the first bad field. Blocking
    (tokenization): call it off the event loop."""
    check_prompt_size(request.prompt, max_prompt_bytes)
    prompt = prompt_ids(request.prompt, tokenizer)
    sampling = request.sampling
    sampling.validate(tokenizer.vocab_size)
    _check_slo(request.slo)
    if sampling.seed is None:
        # Drawn here so that any worker continuing this request draws the same tokens.
        sampling = dataclasses.replace(sampling, seed=_seeds.getrandbits(63))
    return SchedulerRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt),
        sampling=sampling,
        slo=request.slo,
        priority=request.priority,
    )


def _check_slo(slo: Slo) -> None:
    for name, value in (("ttft_ms", slo.ttft_ms), ("tpot_ms", slo.tpot_ms)):
        if not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"slo.{name}", f"is {value}", "use a positive number of milliseconds, or 0 for none")


def check_prompt_size(prompt: Prompt, max_bytes: int) -> None:
    """Refuse text longer than `max_bytes` of UTF-8 before anything tokenizes it (tokenizing
    megabytes costs seconds of CPU)."""
    if isinstance(prompt, TextPrompt):
        texts = [prompt.text]
    elif isinstance(prompt, ChatPrompt):
        texts = [m.content for m in prompt.messages]
    else:
        return
    # Characters never outnumber bytes: only a text that might fit is encoded to be measured.
    size = sum(len(t) for t in texts)
    if size <= max_bytes:
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if size > max_bytes:
        raise InvalidRequest(
            prompt.field, f"is {size} bytes or more, over the scheduler's limit of {max_bytes} (max_prompt_bytes)",
            "send a shorter prompt",
        )  # fmt: skip


def prompt_ids(prompt: Prompt, tokenizer: Tokenizer) -> list[int]:
    if isinstance(prompt, TextPrompt):
        if not prompt.text:
            raise InvalidRequest(prompt.field, "is empty", "send some text, token ids or chat messages")
        ids = tokenizer.encode(prompt.text, add_special_tokens=True)  # BOS where the model expects one
    elif isinstance(prompt, TokenPrompt):
        ids = list(prompt.ids)
        vocab = tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(prompt.field, f"contains {bad}", f"use ids below the vocabulary size {vocab}")
    else:
        if not prompt.messages:
            raise InvalidRequest(prompt.field, "is empty", "send at least one message")
        messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    if not ids:
        raise InvalidRequest(prompt.field, "has no tokens", "send a non-empty prompt")
    return ids
