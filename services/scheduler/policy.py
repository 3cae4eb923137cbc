"""Placement policies: which workers run a request, and whether its prefill is handed off.

Contract (every policy): given the request's shape and the live workers, return a Placement
naming a decode worker and either a prefill worker (ExecutionPlan.DISAGGREGATED) or none (the
decode worker prefills itself, LOCAL_PREFILL). A policy never blocks and never calls a worker; it
reads the registry's last reports and the prefix index. The rule shared by all: prefill on the
decode worker when the prompt tokens it would compute (those neither its own cache nor the KV
store holds) are few — a hand-off costs more than computing a few tokens where they will be
decoded — or when no prefill worker is live.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pdmesh.config import PolicyName
from pdmesh.enums import ExecutionPlan, WorkerRole
from services.scheduler.prefix import PromptBlocks
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry, Worker
from services.scheduler.request import SchedulerRequest
from services.status import NoLiveWorker

# What fetching a token's KV from the KV store costs, against computing it: the reference
# measured 235 ms against 1,988 ms for a 48k-token prefix on an H200 (about 0.12).
FETCH_COST = 0.12


@dataclass(frozen=True)
class RequestShape:
    """What a policy may know of a request: its size, targets, and where its prefix lives."""

    prompt: PromptBlocks
    max_tokens: int
    ttft_ms: float  # 0: no target
    tpot_ms: float
    stores: tuple[str, ...] = ()  # the KV stores workers fetch from now (their ids in the prefix index)

    @classmethod
    def of(
        cls, request: SchedulerRequest, index: PrefixIndex | None = None, stores: Sequence[str] = ()
    ) -> RequestShape:
        return cls(
            PromptBlocks(request.prompt_token_ids, index), request.sampling.max_tokens, request.slo.ttft_ms,
            request.slo.tpot_ms, tuple(stores),
        )  # fmt: skip

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)

    def cached_tokens(self, worker: Worker) -> int:
        """Prompt tokens the worker's own prefix cache holds."""
        return self.prompt.cached_tokens(worker)

    def stored_tokens(self, worker: Worker) -> int:
        """Prompt tokens of the worker's KV layout the KV store holds (what it could fetch)."""
        return self.prompt.stored_tokens(worker.info.kv_layout, self.stores)

    def uncached_tokens(self, worker: Worker) -> int:
        """Prompt tokens the worker would compute: those neither its own cache nor the store holds."""
        return self.prompt_tokens - max(self.cached_tokens(worker), self.stored_tokens(worker))

    def fetched_tokens(self, worker: Worker) -> int:
        """Prompt tokens the worker would fetch from the store: past what its own cache holds."""
        return max(0, self.stored_tokens(worker) - self.cached_tokens(worker))

    def prefill_cost(self, worker: Worker) -> float:
        """The worker's prefill work queued ahead of this request plus this request's, in token
        equivalents: what it computes, and a fraction of a token for each one it fetches."""
        return worker.queued_prefill_tokens + self.uncached_tokens(worker) + FETCH_COST * self.fetched_tokens(worker)


@dataclass(frozen=True)
class Placement:
    decode: Worker
    prefill: Worker | None  # None: the decode worker prefills itself

    @property
    def plan(self) -> ExecutionPlan:
        return ExecutionPlan.LOCAL_PREFILL if self.prefill is None else ExecutionPlan.DISAGGREGATED


class Policy(Protocol):
    name: PolicyName

    def place(self, shape: RequestShape, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Placement:
        """A placement over the given (non-empty `decode`) live workers."""
        ...


class _Base:
    name: PolicyName

    def __init__(self, local_prefill_max_tokens: int) -> None:
        self.local_prefill_max_tokens = local_prefill_max_tokens

    def place(self, shape: RequestShape, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Placement:
        assert decode, "the caller checks that a decode worker is live"
        decode_worker = self.pick_decode(decode)
        if not prefill or shape.uncached_tokens(decode_worker) <= self.local_prefill_max_tokens:
            return Placement(decode_worker, None)
        return Placement(decode_worker, self.pick_prefill(prefill))

    def pick_decode(self, workers: Sequence[Worker]) -> Worker:
        raise NotImplementedError

    def pick_prefill(self, workers: Sequence[Worker]) -> Worker:
        raise NotImplementedError


class RoundRobin(_Base):
    """Each role's workers in turn, in registration order."""

    name = PolicyName.ROUND_ROBIN

    def __init__(self, local_prefill_max_tokens: int) -> None:
        super().__init__(local_prefill_max_tokens)
        # One turn per role: a shared one would step twice per disaggregated request and, with one
        # decode worker and two prefill workers, always land on the same prefill worker.
        self._turns = {WorkerRole.PREFILL: itertools.count(), WorkerRole.DECODE: itertools.count()}

    def _next(self, role: WorkerRole, workers: Sequence[Worker]) -> Worker:
        ordered = sorted(workers, key=lambda w: w.registered_at)
        return ordered[next(self._turns[role]) % len(ordered)]

    def pick_decode(self, workers: Sequence[Worker]) -> Worker:
        return self._next(WorkerRole.DECODE, workers)

    def pick_prefill(self, workers: Sequence[Worker]) -> Worker:
        return self._next(WorkerRole.PREFILL, workers)


class LeastLoaded(_Base):
    """Decode: the most free KV blocks, then the fewest requests (running, waiting and assigned
    here since the last report). Prefill: the least queued work."""

    name = PolicyName.LEAST_LOADED

    def pick_decode(self, workers: Sequence[Worker]) -> Worker:
        return min(workers, key=lambda w: (-w.free_fraction, w.busy))

    def pick_prefill(self, workers: Sequence[Worker]) -> Worker:
        return min(workers, key=lambda w: w.busy)


class PrefixAware(LeastLoaded):
    """Where the prompt's prefix lives, weighed against load: "sticky until saturated".

    Each worker's cost for a request is the prefill work already queued on it (the tokens this
    scheduler placed there whose first token has not come back) plus the tokens it would compute
    for this prompt (those neither its own cache nor the KV store holds) plus a fraction of a token
    (FETCH_COST) for each one it would fetch from the store. The cheapest wins: a worker holding the
    prefix keeps getting it until its queue costs more than recomputing elsewhere, and the store
    makes every worker a little sticky. Prefill happens on a decode worker when it would compute at
    most local_prefill_max_tokens (the cheapest such); otherwise the decode worker is the least
    loaded, as in least_loaded, and the prefill worker the cheapest.
    """

    name = PolicyName.PREFIX_AWARE

    def place(self, shape: RequestShape, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Placement:
        assert decode, "the caller checks that a decode worker is live"
        local = [w for w in decode if shape.uncached_tokens(w) <= self.local_prefill_max_tokens]
        if local or not prefill:
            return Placement(min(local or decode, key=lambda w: (shape.prefill_cost(w), w.busy)), None)
        return Placement(self.pick_decode(decode), min(prefill, key=lambda w: (shape.prefill_cost(w), w.busy)))


def make_policy(name: PolicyName, local_prefill_max_tokens: int) -> Policy:
    policies: dict[PolicyName, type[_Base]] = {
        PolicyName.ROUND_ROBIN: RoundRobin, PolicyName.LEAST_LOADED: LeastLoaded, PolicyName.PREFIX_AWARE: PrefixAware,
    }  # fmt: skip
    return policies[name](local_prefill_max_tokens)


def place(policy: Policy, registry: Registry, shape: RequestShape, exclude: Sequence[Worker] = ()) -> Placement:
    """The policy's placement over the live workers but `exclude`; a prefill worker pairs only
    with a decode worker of the same KV layout."""
    decode = registry.live(WorkerRole.DECODE, exclude)
    if not decode:
        raise NoLiveWorker("decode workers", "none is serving", "start a decode worker or wait for one")
    prefill = registry.live(WorkerRole.PREFILL, exclude)
    placement = policy.place(shape, prefill, decode)
    if placement.prefill is None:
        return placement
    same = [w for w in prefill if w.info.kv_layout == placement.decode.info.kv_layout]
    return Placement(placement.decode, placement.prefill if placement.prefill in same else (same[0] if same else None))


def replace_decode(policy: Policy, registry: Registry, shape: RequestShape, failed: Worker) -> Worker:
    """Another decode worker for a request whose decode worker failed mid-stream."""
    others = registry.live(WorkerRole.DECODE, exclude=(failed,))
    if not others:
        raise NoLiveWorker("decode workers", "the request's decode worker failed and no other is serving",
                           "start another decode worker")  # fmt: skip
    return policy.place(shape, [], others).decode
