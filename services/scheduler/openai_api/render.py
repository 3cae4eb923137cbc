"""The scheduler's Responses -> OpenAI API JSON: streamed chunks and whole answers, for chat and
text completions.

A stream sends one chunk per chunk the workers sent (so a client's inter-token timing sees the
mesh's), the first carrying the assistant role, the last the finish reason; with
`stream_options.include_usage` every chunk has `"usage": null` and one more chunk after the last
carries the usage and no choices, as the OpenAI API does. Finish reasons are OpenAI's `stop` and
`length`, and vLLM's `abort` for a request the server ended; `stop_reason` (vLLM's extension)
names the stop string or token id that matched.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.tokenizer import Tokenizer
from pdmesh.enums import FinishReason
from services.scheduler.request import Finish, Response, TokenChunk, Usage

Json = dict[str, Any]

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


@dataclass(frozen=True)
class Reply:
    """What every chunk and answer of one request repeats."""

    id: str
    model: str
    created: int

    @classmethod
    def of(cls, prefix: str, request_id: str, model: str) -> Reply:
        return cls(f"{prefix}-{request_id}", model, int(time.time()))


def usage_json(usage: Usage) -> Json:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def _finish(finish: Finish | None) -> Json:
    if finish is None:
        return {"finish_reason": None}
    stop = finish.stop_string if finish.stop_string is not None else finish.stop_token_id
    return {"finish_reason": _FINISH.get(finish.reason, finish.reason.value), "stop_reason": stop}


@dataclass(frozen=True)
class RenderOptions:
    logprobs: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    # vLLM's stream_options.continuous_usage_stats: every chunk carries the counts so far, so a
    # client can tell how many tokens each chunk holds (a chunk's text can be empty: held back).
    continuous_usage: bool = False
    num_prompt_tokens: int = 0


class Renderer(abc.ABC):
    """One request's rendering."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, reply: Reply, tokenizer: Tokenizer, options: RenderOptions) -> None:
        self.reply = reply
        self.tokenizer = tokenizer
        self.options = options
        self._sent_first = False
        self._num_tokens = 0

    def chunk(self, response: Response) -> Json | None:
        """The stream chunk for a response; None when it adds nothing (no token, text or finish).
        A token whose text is held back still gets its chunk, so clients time every token."""
        chunk = response.chunk
        self._num_tokens += len(chunk.token_ids)
        first, self._sent_first = not self._sent_first, True
        if not (first or chunk.token_ids or chunk.text or chunk.finish is not None):
            return None
        choice = {"index": 0, **self._delta(chunk, first), **self._logprobs([chunk]), **_finish(chunk.finish)}
        body = self._head(self.chunk_object_name, [choice])
        if self.options.continuous_usage:
            prompt = self.options.num_prompt_tokens
            body["usage"] = {"prompt_tokens": prompt, "completion_tokens": self._num_tokens,
                             "total_tokens": prompt + self._num_tokens}  # fmt: skip
        elif self.options.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: Usage) -> Json:
        return {**self._head(self.chunk_object_name, []), "usage": usage_json(usage)}

    def answer(self, responses: Sequence[Response]) -> Json:
        """The whole answer of a request that was not streamed."""
        chunks = [r.chunk for r in responses]
        text = "".join(c.text for c in chunks)
        choice = {"index": 0, **self._whole(text), **self._logprobs(chunks), **_finish(chunks[-1].finish)}
        usage = responses[-1].usage
        return {**self._head(self.object_name, [choice]), "usage": usage_json(usage) if usage else None}

    def _head(self, object_name: str, choices: list[Json]) -> Json:
        r = self.reply
        return {"id": r.id, "object": object_name, "created": r.created, "model": r.model, "choices": choices}

    def _token_texts(self, chunks: Sequence[TokenChunk]) -> list[tuple[str, float]]:
        return [
            (self.tokenizer.decode([t], skip_special_tokens=False), lp)
            for c in chunks for t, lp in zip(c.token_ids, c.logprobs, strict=False)
        ]  # fmt: skip

    @abc.abstractmethod
    def _delta(self, chunk: TokenChunk, first: bool) -> Json:
        """A stream chunk's choice content."""

    @abc.abstractmethod
    def _whole(self, text: str) -> Json:
        """A whole answer's choice content."""

    @abc.abstractmethod
    def _logprobs(self, chunks: Sequence[TokenChunk]) -> Json:
        """The choice's logprobs field."""


class ChatRenderer(Renderer):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _delta(self, chunk: TokenChunk, first: bool) -> Json:
        delta: Json = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        if chunk.finish is not None and not chunk.text and not first:
            delta = {}
        return {"delta": delta}

    def _whole(self, text: str) -> Json:
        return {"message": {"role": "assistant", "content": text}}

    def _logprobs(self, chunks: Sequence[TokenChunk]) -> Json:
        if not self.options.logprobs:
            return {"logprobs": None}
        content = [
            {"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []}
            for text, lp in self._token_texts(chunks)
        ]
        return {"logprobs": {"content": content}}


class CompletionRenderer(Renderer):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def _delta(self, chunk: TokenChunk, first: bool) -> Json:
        return {"text": chunk.text}

    def _whole(self, text: str) -> Json:
        return {"text": text}

    def _logprobs(self, chunks: Sequence[TokenChunk]) -> Json:
        if not self.options.logprobs:
            return {"logprobs": None}
        pairs = self._token_texts(chunks)
        return {"logprobs": {"tokens": [t for t, _ in pairs], "token_logprobs": [lp for _, lp in pairs],
                             "top_logprobs": None, "text_offset": None}}  # fmt: skip
