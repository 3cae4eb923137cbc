"""What the scheduler's core works on: one client request, validated, and the messages it
exchanges with workers, as plain dataclasses. Protobuf stops at convert.py.

A ticket is not read here: the scheduler only carries the decode worker's ticket to the prefill
worker (TicketHandle); kvtransfer's Ticket is the one type that describes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from pdmesh.enums import ExecutionPlan, FinishReason, Priority


@dataclass(frozen=True)
class Slo:
    ttft_ms: float = 0.0  # 0: no target
    tpot_ms: float = 0.0


@dataclass(frozen=True)
class SchedulerRequest:
    """A client's request once the door accepted it: tokenized, validated, its seed chosen."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams  # what every worker gets; seed always set
    slo: Slo = Slo()
    priority: Priority = Priority.NORMAL
    received_at: float | None = None  # time.monotonic() when the door got it: its TTFT runs from then

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Deadline:
    """The client's deadline: every downstream call gets what is left (gRPC Python does not
    forward deadlines by itself)."""

    at: float | None  # time.monotonic(); None: no deadline

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def left(self, cap_s: float | None = None) -> float | None:
        left = None if self.at is None else max(0.0, self.at - time.monotonic())
        if cap_s is None:
            return left
        return cap_s if left is None else min(cap_s, left)

    @property
    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


@dataclass(frozen=True)
class TicketHandle:
    """A decode worker's ticket as the scheduler holds it: the id it commits or releases, and the
    KVTicket message as the decode worker wrote it, passed to the prefill worker unread."""

    ticket_id: str
    encoded: bytes


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    stop_token_id: int | None = None  # what matched, when reason is STOP
    stop_string: str | None = None


@dataclass(frozen=True)
class TokenChunk:
    """Tokens a worker generated since its previous chunk; `finish` on the last one only."""

    token_ids: tuple[int, ...]
    text: str = ""
    logprobs: tuple[float, ...] = ()
    finish: Finish | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts and timings of one request (a worker fills what it measured, the rest is 0)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    e2e_ms: float = 0.0
    transfer_bytes: int = 0
    schedule_ms: float = 0.0  # arrival until the prompt went to the worker computing it
    transfer_overlap_ms: float = 0.0  # KV transfer hidden behind prefill compute
    computed_prompt_tokens: int = 0
    worker_cached_prompt_tokens: int = 0  # of cached_prompt_tokens, from the prefilling worker's cache
    store_cached_prompt_tokens: int = 0  # of cached_prompt_tokens, fetched from the KV store
    transferred_prompt_tokens: int = 0  # pushed from the prefill worker to the decode worker


@dataclass(frozen=True)
class Prefilled:
    """A prefill worker's answer: the first token, and what computing and pushing it cost."""

    chunk: TokenChunk
    usage: Usage  # where the prompt's KV came from; queue, prefill and transfer times; transfer_bytes


@dataclass(frozen=True)
class Decoded:
    """One piece of a decode worker's stream; usage on the last one only."""

    chunk: TokenChunk
    usage: Usage | None = None


@dataclass
class PlacementReport:
    """Where a request ran, as the last response tells the client."""

    plan: ExecutionPlan | None = None  # None until placed
    prefill_worker_id: str = ""
    decode_worker_id: str = ""
    num_decode_failovers: int = 0


@dataclass(frozen=True)
class Response:
    """One piece of the client's stream; usage and placement on the last one only."""

    request_id: str
    chunk: TokenChunk
    usage: Usage | None = None
    placement: PlacementReport | None = None
