"""What a request must satisfy to be added: its id against the engine's state (check_request_id:
unique, and a reservation's exactly when it brings that reservation's import), then, whatever the
engine holds (check_request), its tokens in the vocabulary, its sampling parameters, its context
within the model's, its KV within the whole cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import InvalidRequest, OutOfBlocks, RequestNotFound
from engine.kv_manager import blocks_for
from engine.sampling_params import SamplingParams, check_context


@dataclass(frozen=True, slots=True)
class RequestLimits:
    vocab_size: int
    has_tokenizer: bool
    max_model_len: int
    block_size: int
    num_blocks: int  # the whole KV cache


def check_request_id(request_id: str, *, running: bool, reserved: bool, importing: bool) -> None:
    """`running`: a live request has the id; `reserved`: a reservation does; `importing`: the request
    brings a KV import, which must be that reservation's."""
    if running:
        raise InvalidRequest("request_id", f"{request_id!r} is already in use", "use a unique request id")
    if reserved and not importing:
        raise InvalidRequest("request_id", f"{request_id!r} names a reservation", "pass its kv_import or abort it")
    if importing and not reserved:
        raise RequestNotFound(f"no reservation for request {request_id!r}; call reserve() first")


def check_request(
    prompt: Sequence[int], prior: Sequence[int], params: SamplingParams, prefill_only: bool, limits: RequestLimits
) -> None:
    """Raise the EngineError naming the first field that breaks a limit."""
    if not prompt:
        raise InvalidRequest("prompt", "is empty", "send at least one token")
    vocab = limits.vocab_size
    if any(not 0 <= t < vocab for t in [*prompt, *prior]):
        raise InvalidRequest("prompt_token_ids", "contains an id outside the vocabulary", f"use ids in [0, {vocab})")
    params.validate(vocab)
    if params.stop and not limits.has_tokenizer:
        raise InvalidRequest("stop", "needs a tokenizer, and this engine has none", "use stop_token_ids")
    check_context(len(prompt) + len(prior), params.max_tokens, limits.max_model_len, len(prior))
    new_tokens = 1 if prefill_only else params.max_tokens  # a prefill_only request holds no output here
    need = blocks_for(len(prompt) + new_tokens, limits.block_size)
    if need > limits.num_blocks:
        raise OutOfBlocks(
            f"the request needs {need} KV blocks and the whole cache has {limits.num_blocks}; "
            "shorten it or give the cache more memory"
        )
