"""The OpenAI API's request bodies as pydantic models: types and shapes only.

pydantic checks what JSON can get wrong (a string where a number goes, NaN, a missing field) and
names the field; what the values mean is checked once, for both doors, by intake.accept. Fields
pdmesh does not implement are declared so that a request using them is refused by name
(convert.py) instead of being ignored; fields no server acts on (`user`, `metadata`) and unknown
ones are ignored, as vLLM does, so clients that send extras keep working. Extensions that vLLM
and SGLang accept (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, ...) are accepted
here too, and pdmesh's own: `slo` and `priority`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage on every chunk


class SloBody(_Body):
    """pdmesh's extension: the request's targets (the x-slo-* headers say the same)."""

    ttft_ms: float = Field(default=0.0, ge=0)
    tpot_ms: float = Field(default=0.0, ge=0)


class TextPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class SamplingFields(_Body):
    """What both endpoints share."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; -1 means off there, as 0 does here
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    slo: SloBody | None = None
    priority: Literal["low", "normal", "high"] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, object]] | None = None
    tool_choice: str | dict[str, object] | None = None
    response_format: dict[str, object] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
