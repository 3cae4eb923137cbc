"""A request's life inside one engine, and what the engine reports back per step.

The engine has no prefill phase and no decode phase: a request has `token_ids` (prompt, then
output) and `num_computed_tokens`, the prefix whose KV is in its blocks. Each step the batcher
lets it catch up by some tokens; when it catches up to the end, a new token is sampled. A prefix
cache hit or an imported KV simply makes `num_computed_tokens` jump.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.handoff import KVExportSink, KVImport
from engine.ids import BlockHash, BlockId, RequestId
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    WAITING_FOR_KV = "waiting_for_kv"  # blocks reserved; someone else is writing its first tokens' KV
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence token, a stop token id or a stop string
    LENGTH = "length"  # max_tokens, or the model's context length
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the request failed (e.g. its KV import failed)


@dataclass(slots=True, eq=False)
class Request:
    request_id: RequestId
    token_ids: list[int]  # prompt followed by output
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    kv_import: KVImport | None = None
    kv_export: KVExportSink | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[BlockId] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)  # of the full blocks of token_ids
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_cached_tokens: int = 0  # prompt tokens whose KV came from this engine's prefix cache
    num_imported_tokens: int = 0  # tokens after those whose KV an import writes (0 once it failed)
    import_optional: bool = False  # a prefix import: if it fails, compute those tokens instead
    num_prior_output_tokens: int = 0  # outputs given at admission (a resumed request); not re-emitted
    prefill_only: bool = False  # ends after its first token; another worker continues it
    priority: int = 0  # higher runs first (the batcher's order); the mesh's Priority levels map here
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request. Token ids and text are deltas, not totals.

    finished with finish_reason None: a prefill_only request, handed on after its first token.
    """

    request_id: RequestId
    new_token_ids: list[int]
    new_logprobs: list[float] | None
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens reused from this engine's prefix cache
    num_output_tokens: int
    queue_s: float | None = None  # arrival to first scheduled step, once scheduled
    error: str | None = None
    stop: int | str | None = None  # with FinishReason.STOP: the stop or EOS token id, or the stop string
    num_imported_tokens: int = 0  # prompt tokens whose KV an import brought (a hand-off or a KV store)

    @property
    def num_computed_prompt_tokens(self) -> int:
        """Prompt tokens this engine computed for the request."""
        return max(0, self.num_prompt_tokens - self.num_cached_tokens - self.num_imported_tokens)
