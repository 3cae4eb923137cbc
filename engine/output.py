"""Turning sampled tokens into what a caller sees: text deltas, stop decisions, finish reasons,
and the RequestOutput a step emits (request_output).

One OutputProcessor per request: incremental detokenization (never half a UTF-8 character),
stop strings cut exactly (even across token boundaries), stop token ids, end-of-sequence and
length limits. Runs on the engine's step thread right after sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.detokenizer import IncrementalDetokenizer, StopChecker
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
