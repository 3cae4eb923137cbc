"""Placement policies: which workers run a request, and whether its prefill is handed off.

Contract (every policy): given the request's shape and the workers it may use (a Pool: live, not
excluded), return a Placement naming a decode worker and either a prefill worker
(ExecutionPlan.DISAGGREGATED) or none (the decode worker prefills itself, LOCAL_PREFILL), or raise
NoCapacity (`slo` only: no plan meets the request's SLO; the error carries when to retry) or
SloOutOfReach (`slo` only: no idle worker could meet it either). A
policy never blocks and never calls a worker; it reads the registry's last reports, the prefix
index and the ledger's bookings. The same policy objects run in the scheduler and in the
simulator (pdmesh sim).

`round_robin`, `least_loaded` and `prefix_aware` share one rule for the plan: prefill on the
decode worker when the prompt tokens it would compute (those neither its own cache nor the KV
store holds) are few — a hand-off costs more than computing a few tokens where they will be
decoded — or when no prefill worker is live; they choose among the live workers of each role
(`choose`), and a prefill worker pairs only with a decode worker of the same KV layout. `slo`
(services/scheduler/slo.py) predicts every plan instead.

placer.Placer is the one entry point of the flow and the simulator: it places with the policy and
keeps the ledger's bookings (placed, first token, ended) and each worker's queued prefill.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pdmesh.config import PolicyName
from pdmesh.enums import ExecutionPlan, Priority, WorkerRole
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

    request_id: str
    prompt: PromptBlocks
    max_tokens: int
    ttft_ms: float  # 0: no target
    tpot_ms: float
    priority: Priority = Priority.NORMAL
    stores: tuple[str, ...] = ()  # the KV stores workers fetch from now (their ids in the prefix index)
    received_at: float | None = None  # the registry's clock when it arrived; None: just now

    @classmethod
    def of(
        cls, request: SchedulerRequest, index: PrefixIndex | None = None, stores: Sequence[str] = (),
        default_ttft_ms: float = 0.0, default_tpot_ms: float = 0.0,
    ) -> RequestShape:  # fmt: skip
        """The request's shape, targets it left at 0 set to the defaults."""
        return cls(
            request.request_id, PromptBlocks(request.prompt_token_ids, index), request.sampling.max_tokens,
            request.slo.ttft_ms or default_ttft_ms, request.slo.tpot_ms or default_tpot_ms, request.priority,
            tuple(stores), request.received_at,
        )  # fmt: skip

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.num_tokens

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
    """Where a request runs, and what the policy predicted for it. The predictions are plain fields
    (None when the policy does not predict) so traces and logs can carry them as they are."""

    decode: Worker
    prefill: Worker | None  # None: the decode worker prefills itself
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None
    cost_ms: float | None = None  # the policy's cost of the plan (compute spent on it)
    cached_tokens: int = 0  # prompt tokens the prefilling worker holds in its prefix cache
    prefill_ms: float | None = None  # predicted compute of the prompt on the prefilling worker

    @property
    def plan(self) -> ExecutionPlan:
        return ExecutionPlan.LOCAL_PREFILL if self.prefill is None else ExecutionPlan.DISAGGREGATED


class Pool:
    """The workers a placement may use: live (registry), not excluded (they just failed it)."""

    def __init__(self, registry: Registry, exclude: Sequence[Worker] = ()) -> None:
        self.registry = registry
        self._exclude = set(map(id, exclude))

    def live(self, role: WorkerRole) -> list[Worker]:
        return [w for w in self.registry.live(role) if id(w) not in self._exclude]

    def usable(self, worker_id: str, role: WorkerRole) -> Worker | None:
        """The worker if placement may use it for `role` now."""
        w = self.registry.workers.get(worker_id)
        if w is None or w.role is not role or w.draining or id(w) in self._exclude or self.registry.is_stale(w):
            return None
        return w


class Policy(Protocol):
    name: PolicyName

    def place(self, shape: RequestShape, pool: Pool) -> Placement:
        """A placement over the pool's workers; NoLiveWorker when no decode worker is usable."""
        ...


def no_decode_worker() -> NoLiveWorker:
    return NoLiveWorker("decode workers", "none is serving", "start a decode worker or wait for one")


class _Base:
    name: PolicyName

    def __init__(self, local_prefill_max_tokens: int) -> None:
        self.local_prefill_max_tokens = local_prefill_max_tokens

    def place(self, shape: RequestShape, pool: Pool) -> Placement:
        decode = pool.live(WorkerRole.DECODE)
        if not decode:
            raise no_decode_worker()
        prefill = pool.live(WorkerRole.PREFILL)
        placement = self.choose(shape, prefill, decode)
        if placement.prefill is None or placement.prefill.info.kv_layout == placement.decode.info.kv_layout:
            return placement
        same = [w for w in prefill if w.info.kv_layout == placement.decode.info.kv_layout]
        return Placement(placement.decode, same[0] if same else None)

    def choose(self, shape: RequestShape, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Placement:
        """A placement over the given live workers (`decode` not empty)."""
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

    def choose(self, shape: RequestShape, prefill: Sequence[Worker], decode: Sequence[Worker]) -> Placement:
        local = [w for w in decode if shape.uncached_tokens(w) <= self.local_prefill_max_tokens]
        if local or not prefill:
            return Placement(min(local or decode, key=lambda w: (shape.prefill_cost(w), w.busy)), None)
        return Placement(self.pick_decode(decode), min(prefill, key=lambda w: (shape.prefill_cost(w), w.busy)))


BASELINES: dict[PolicyName, type[_Base]] = {
    PolicyName.ROUND_ROBIN: RoundRobin, PolicyName.LEAST_LOADED: LeastLoaded, PolicyName.PREFIX_AWARE: PrefixAware,
}  # fmt: skip
