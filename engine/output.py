"""Turning sampled tokens into what a caller sees: text deltas, stop decisions, finish reasons,
and the RequestOutput a step emits (request_output).

One OutputProcessor per request: incremental detokenization (never half a UTF-8 character),
stop strings cut exactly (even across token boundaries), stop token ids, end-of-sequence and
length limits. Runs on the engine's step thread right after sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.ids import RequestId
from engine.request import FinishReason, Request, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        params: SamplingParams,
        context_ids: Sequence[int],
        eos_token_ids: Sequence[int],
        max_model_len: int,
    ) -> None:
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.detok = IncrementalDetokenizer(tokenizer, list(context_ids)) if tokenizer is not None else None
        self.stops = StopChecker(list(params.stop), params.include_stop_str_in_output) if params.stop else None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(eos_token_ids)
        self.stop_ids = frozenset(stop_ids)
        self.max_model_len = max_model_len
        self.stop: int | str | None = None  # what matched, once a stop finished the request

    def on_token(self, request: Request, token_id: int) -> tuple[str, FinishReason | None]:
        """Account for a token already appended to request.token_ids; returns (text delta, finish)."""
        if token_id in self.stop_ids:
            self.stop = token_id
            return self.flush(), FinishReason.STOP
        text = self.detok.step(token_id) if self.detok is not None else ""
        if self.stops is not None:
            text, matched = self.stops.feed(text)
            if matched:
                self.stop = self.stops.matched
                return text, FinishReason.STOP
        if request.num_output_tokens >= request.params.max_tokens or request.num_tokens >= self.max_model_len:
            return text + self.flush(), FinishReason.LENGTH
        return text, None

    def ends_without_text(self, request: Request, token_id: int) -> bool | None:
        """For a request with no stop string: whether `token_id` (appended already) ends it — None
        when that takes its text (a stop string to watch): call on_token then. When False, the
        token's text is owed: decode it later with text_of, in token order, before the next token."""
        if self.stops is not None:
            return None
        if token_id in self.stop_ids:
            return True
        return request.num_output_tokens >= request.params.max_tokens or request.num_tokens >= self.max_model_len

    def text_of(self, token_id: int) -> str:
        """The text delta of a token that did not end its request (ends_without_text said False)."""
        return self.detok.step(token_id) if self.detok is not None else ""

    def flush(self) -> str:
        """The text held back for a possible stop string, released (the request ends here)."""
        return self.stops.flush() if self.stops is not None else ""


def request_output(request: Request, ids: list[int], logprobs: list[float] | None, text: str) -> RequestOutput:
    """What a step emits for a request: its new tokens and text, and where it stands."""
    return RequestOutput(
        request_id=request.request_id,
        new_token_ids=ids,
        new_logprobs=logprobs,
        text_delta=text,
        finished=request.finished,
        finish_reason=request.finish_reason,
        num_prompt_tokens=request.num_prompt_tokens,
        num_cached_tokens=request.num_cached_tokens,
        num_imported_tokens=request.num_imported_tokens,
        num_output_tokens=request.num_output_tokens - request.num_prior_output_tokens,
        queue_s=(
            None if request.first_scheduled_time is None else request.first_scheduled_time - request.arrival_time
        ),
    )


@dataclass(slots=True)
class _Owed:
    """An output whose text is decoded when the step's outputs are built; its counts as they were."""

    request: Request
    processor: OutputProcessor
    token_id: int
    logprobs: list[float] | None
    num_output_tokens: int  # the request's, this step (later steps or an abort change the request's)

    def build(self) -> RequestOutput:
        r = self.request
        return RequestOutput(
            request_id=r.request_id, new_token_ids=[self.token_id], new_logprobs=self.logprobs,
            text_delta=self.processor.text_of(self.token_id), finished=False, finish_reason=None,
            num_prompt_tokens=r.num_prompt_tokens, num_cached_tokens=r.num_cached_tokens,
            num_imported_tokens=r.num_imported_tokens, num_output_tokens=self.num_output_tokens,
            queue_s=None if r.first_scheduled_time is None else r.first_scheduled_time - r.arrival_time,
        )  # fmt: skip


class HeldOutputs:
    """One step's outputs, some still owing their text; build() decodes it, once, in token order."""

    def __init__(self) -> None:
        self._items: list[RequestOutput | _Owed] = []
        self._built: list[RequestOutput] | None = None

    def add(self, output: RequestOutput) -> None:
        self._items.append(output)

    def owe(self, request: Request, processor: OutputProcessor, token_id: int, logprobs: list[float] | None) -> None:
        n = request.num_output_tokens - request.num_prior_output_tokens
        self._items.append(_Owed(request, processor, token_id, logprobs, n))

    def __len__(self) -> int:
        return len(self._items)

    def request_ends(self) -> list[tuple[RequestId, bool]]:
        """Each output's request id and whether it ends that request, in build() order (known
        before building: an output still owing text never ends its request)."""
        return [(i.request_id, i.finished) if isinstance(i, RequestOutput) else (i.request.request_id, False)
                for i in self._items]  # fmt: skip

    def build(self) -> list[RequestOutput]:
        if self._built is None:
            self._built = [i if isinstance(i, RequestOutput) else i.build() for i in self._items]
            self._items = []
        return self._built
