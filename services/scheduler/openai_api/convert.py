"""OpenAI API bodies and headers -> the scheduler's ClientRequest: the HTTP door's reading.

What the OpenAI API asks and pdmesh does not do (n > 1, tools, top_logprobs, echo, frequency or
presence penalties, ...) is refused here, naming the field and what to send instead; a silently
ignored sampling field would give a client output it did not ask for. Everything else is checked
by intake.accept, the gRPC door's check too. Defaults are the OpenAI API's: temperature 1, and
max_tokens up to the context window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from engine.errors import InvalidRequest
from engine.sampling_params import SamplingParams
from pdmesh.enums import Priority
from services.scheduler.intake import ChatMessage, ChatPrompt, ClientRequest, Prompt, TextPrompt, TokenPrompt
from services.scheduler.openai_api.schemas import ChatCompletionRequest, CompletionRequest, Message, SamplingFields
from services.scheduler.request import Slo

# Headers as llm-d names them; a body field (`slo`, `priority`) wins over its header.
SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"
PRIORITY_HEADER = "x-priority"
TIMEOUT_HEADER = "x-request-timeout-ms"
REQUEST_ID_HEADER = "x-request-id"
_OPENAI_TEMPERATURE = 1.0


@dataclass(frozen=True)
class RequestHeaders:
    """What a request's headers add to its body."""

    slo: Slo = Slo()
    priority: Priority | None = None
    timeout_s: float | None = None  # None: the door's default
    request_id: str = ""

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> RequestHeaders:
        priority = headers.get(PRIORITY_HEADER)
        timeout_ms = _number(headers, TIMEOUT_HEADER, positive=True)
        return cls(
            slo=Slo(ttft_ms=_number(headers, SLO_TTFT_HEADER) or 0.0, tpot_ms=_number(headers, SLO_TPOT_HEADER) or 0.0),
            priority=_priority(priority, PRIORITY_HEADER) if priority is not None else None,
            timeout_s=timeout_ms / 1000 if timeout_ms is not None else None,
            request_id=headers.get(REQUEST_ID_HEADER, "")[:128],
        )


def chat_request(body: ChatCompletionRequest, headers: RequestHeaders) -> ClientRequest:
    if body.tools:
        _unsupported("tools", "tools were sent", "pdmesh does not call tools; send the conversation without them")
    if body.tool_choice not in (None, "none"):
        _unsupported("tool_choice", f"is {body.tool_choice!r}", "pdmesh calls no tools; send 'none' or leave it out")
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        _unsupported("response_format", f"asks for {kind!r}", "pdmesh answers in plain text; send {'type': 'text'}")
    if body.top_logprobs:
        _unsupported("top_logprobs", f"is {body.top_logprobs}", "pdmesh returns the sampled token's logprob; send 0")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    messages = tuple(_message(m, i) for i, m in enumerate(body.messages))
    return _client_request(body, ChatPrompt(messages), max_tokens, body.logprobs, headers)


def completion_request(body: CompletionRequest, headers: RequestHeaders) -> ClientRequest:
    if body.echo:
        _unsupported("echo", "is true", "pdmesh returns the completion only; leave echo out")
    if body.suffix:
        _unsupported("suffix", "is set", "pdmesh does not insert text; leave suffix out")
    if body.best_of not in (None, 1):
        _unsupported("best_of", f"is {body.best_of}", "pdmesh returns one choice per request; send 1")
    if body.logprobs:
        _unsupported("logprobs", f"is {body.logprobs}", "pdmesh returns the sampled token's logprob only; send 0")
    return _client_request(body, _prompt(body.prompt), body.max_tokens, body.logprobs is not None, headers)


def _client_request(
    body: SamplingFields, prompt: Prompt, max_tokens: int | None, logprobs: bool, headers: RequestHeaders
) -> ClientRequest:
    _refuse_unsupported(body)
    defaults = SamplingParams()
    sampling = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
        temperature=body.temperature if body.temperature is not None else _OPENAI_TEMPERATURE,
        top_k=0 if body.top_k in (None, -1) else body.top_k,  # -1: vLLM's "off"
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        min_p=body.min_p if body.min_p is not None else defaults.min_p,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        seed=body.seed,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        include_stop_str_in_output=body.include_stop_str_in_output,
    )
    slo = Slo(body.slo.ttft_ms, body.slo.tpot_ms) if body.slo is not None else headers.slo
    priority = _priority(body.priority, "priority") if body.priority is not None else headers.priority
    return ClientRequest(
        prompt=prompt, sampling=sampling, model=body.model or "", request_id=headers.request_id, slo=slo,
        priority=priority or Priority.NORMAL, max_tokens_unset=max_tokens is None,
    )  # fmt: skip


def _refuse_unsupported(body: SamplingFields) -> None:
    if body.n not in (None, 1):
        _unsupported("n", f"is {body.n}", "pdmesh returns one choice per request; send n=1 and several requests")
    if body.logit_bias:
        _unsupported("logit_bias", "is set", "leave it out")
    if body.min_tokens:
        _unsupported("min_tokens", f"is {body.min_tokens}", "leave it out; ignore_eos generates exactly max_tokens")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            _unsupported(name, f"is {getattr(body, name)}", "send 0, or use repetition_penalty (vLLM's extension)")


def _message(message: Message, index: int) -> ChatMessage:
    content = message.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(
                    f"messages[{index}].content[{j}]", f"is a {part.type!r} part", "send text parts only"
                )
        content = "\n".join(p.text or "" for p in content)
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for it
    return ChatMessage(role, content or "")


def _prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> Prompt:
    if isinstance(prompt, str):
        return TextPrompt(prompt)
    if prompt and isinstance(prompt[0], (str, list)):  # a batch: one prompt is accepted
        if len(prompt) != 1:
            raise InvalidRequest("prompt", f"holds {len(prompt)} prompts", "send one prompt per request")
        only = prompt[0]
        return TextPrompt(only) if isinstance(only, str) else TokenPrompt(tuple(only))
    return TokenPrompt(tuple(t for t in prompt if isinstance(t, int)))  # all are, by the schema


def _priority(value: str, field: str) -> Priority:
    try:
        return Priority[value.strip().upper()]
    except KeyError:
        raise InvalidRequest(field, f"is {value!r}", "use low, normal or high") from None


def _number(headers: Mapping[str, str], name: str, positive: bool = False) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise InvalidRequest(name, f"is {raw!r}", "send a positive number of milliseconds")
    return value


def _unsupported(field: str, problem: str, fix: str) -> None:
    raise InvalidRequest(field, f"{problem}, which pdmesh does not support", fix)
