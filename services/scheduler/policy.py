"""Placement policies: which workers run a request, and whether its prefill is handed off.

Contract (every policy): given the request's shape and the live workers, return a Plan naming a
decode worker and either a prefill worker (disaggregated) or none (the decode worker prefills
itself). A policy never blocks and never calls a worker; it reads the registry's last reports.
The rule shared by all: prefill on the decode worker when the uncached prompt is short (a
hand-off costs more than computing a few tokens where they will be decoded) or when no prefill
worker is live.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.scheduler.registry import Worker


@dataclass(frozen=True)
class RequestShape:
    prompt_tokens: int
    cached_tokens: int  # the policy's estimate of the prompt prefix already cached on a worker
    max_tokens: int
    ttft_ms: float  # 0: no target
    tpot_ms: float

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class Plan:
    decode: Worker
    prefill: Worker | None  # None: the decode worker prefills itself

    @property
    def local(self) -> bool:
        return self.prefill is None


class Policy(Protocol):
    name: str

    def place(self, shape: RequestShape, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Plan:
        """A plan over the given (non-empty `decode`) live workers."""
        ...


class _Base:
    name = "base"

    def __init__(self, local_prefill_max_tokens: int) -> None:
        self.local_prefill_max_tokens = local_prefill_max_tokens

    def place(self, shape: RequestShape, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Plan:
        assert decode, "the caller checks that a decode worker is live"
        decode_worker = self.pick_decode(decode)
        if not prefill or shape.uncached_tokens <= self.local_prefill_max_tokens:
            return Plan(decode_worker, None)
        return Plan(decode_worker, self.pick_prefill(prefill))

    def pick_decode(self, workers: Sequence[Worker]) -> Worker:
        raise NotImplementedError

    def pick_prefill(self, workers: Sequence[Worker]) -> Worker:
        raise NotImplementedError


class RoundRobin(_Base):
    """Each role's workers in turn, in registration order."""

    name = "round_robin"

    def __init__(self, local_prefill_max_tokens: int) -> None:
        super().__init__(local_prefill_max_tokens)
        self._turn = itertools.count()

    def _next(self, workers: Sequence[Worker]) -> Worker:
        ordered = sorted(workers, key=lambda w: w.registered_at)
        return ordered[next(self._turn) % len(ordered)]

    pick_decode = _next
    pick_prefill = _next


class LeastLoaded(_Base):
    """Decode: the most free KV blocks, then the fewest requests (running, waiting and assigned
    here since the last report). Prefill: the least queued work."""

    name = "least_loaded"

    def pick_decode(self, workers: Sequence[Worker]) -> Worker:
        def score(w: Worker) -> tuple[float, int]:
            total = max(1, w.load.num_kv_blocks_total)
            busy = w.load.num_running_requests + w.load.num_waiting_requests
            return (-w.load.num_kv_blocks_free / total, max(busy, w.assigned))

        return min(workers, key=score)

    def pick_prefill(self, workers: Sequence[Worker]) -> Worker:
        return min(workers, key=lambda w: (max(w.load.num_waiting_requests + w.load.num_running_requests, w.assigned)))


def make_policy(name: str, local_prefill_max_tokens: int) -> Policy:
    policies: dict[str, type[_Base]] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded}
    return policies[name](local_prefill_max_tokens)
