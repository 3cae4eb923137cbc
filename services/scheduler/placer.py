"""The door to placement for the request flow and the simulator alike: a policy by name, and the
ledger of what was placed where.

`Placer.place` asks the policy for a placement over the live workers and books it in the ledger;
the flow (or the simulator, at the same moments) then tells it of the request's first token
(`prefilled`) and of its end (`ended`). Until the first token, the prompt tokens the prefilling
worker computes count as that worker's queued prefill (`Worker.queued_prefill_tokens`, what
prefix_aware weighs affinity against), and the prompt's blocks are marked in the prefix index as
held by that worker (PrefixIndex.expect): its reports will say so only after the prefill, and the
requests of the same prefix placed meanwhile should find it there ("sticky until saturated" from
the first request; every policy but `slo`). The mark lapses a stale period after the first token
(the worker's reports carry the blocks by then), and goes at once with a request that ends before
it. Targets a request leaves at 0 take the configured defaults here (`shape`), so every policy and
the ledger see the same targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdmesh.config import PolicyName, SloConfig
from pdmesh.enums import WorkerRole
from services.scheduler.forecast import DEFAULT_BUDGET_TOKENS
from services.scheduler.ledger import Booking, Ledger
from services.scheduler.margin import MarginSettings
from services.scheduler.policy import BASELINES, Placement, Policy, Pool, RequestShape
from services.scheduler.registry import Registry, Worker
from services.scheduler.request import SchedulerRequest
from services.scheduler.slo import SloPolicy, SloSettings
from services.status import NoLiveWorker


def make_policy(
    name: PolicyName, registry: Registry, ledger: Ledger, slo: SloConfig, local_prefill_max_tokens: int
) -> Policy:
    if name is PolicyName.SLO:
        margins = MarginSettings(quantile=slo.margin_quantile, window=slo.margin_window, horizon_s=slo.margin_horizon_s)
        settings = SloSettings(
            candidates=slo.candidates, overhead_ms=slo.overhead_ms, tie_fraction=slo.tie_fraction,
            wait_weight=slo.wait_weight,
            retry_min_s=slo.retry_min_s, retry_max_s=slo.retry_max_s, margins=margins,
        )  # fmt: skip
        return SloPolicy(registry, ledger, settings)
    return BASELINES[name](local_prefill_max_tokens)


class Placer:
    """Places requests with a policy and keeps the ledger: the flow's and the simulator's door."""

    def __init__(self, policy: Policy, registry: Registry, ledger: Ledger, slo: SloConfig) -> None:
        self.policy = policy
        self.registry = registry
        self.ledger = ledger
        self.slo = slo
        # Marks in the prefix index for the baselines (prefix_aware weighs them), not for `slo`:
        # its forecasts and their margins are of reported caches, and a marked block may still be
        # computing when the next request's step runs (whether slo should count marks is open).
        self.marks = policy.name is not PolicyName.SLO
        self._prefilling: dict[str, tuple[Worker, int]] = {}  # request id -> (worker, queued tokens)
        for worker in registry.workers.values():
            self._track(worker)
        registry.on_add.append(self._track)

    def shape(self, request: SchedulerRequest) -> RequestShape:
        return RequestShape.of(
            request, self.registry.index, self.registry.live_store_ids(), self.slo.default_ttft_ms,
            self.slo.default_tpot_ms,
        )  # fmt: skip

    def place(self, shape: RequestShape, exclude: Sequence[Worker] = ()) -> Placement:
        """The policy's placement over the live workers but `exclude`, booked in the ledger."""
        placement = self.policy.place(shape, Pool(self.registry, exclude))
        self._book(shape, placement)
        return placement

    def wait_budget_s(self, shape: RequestShape) -> float:
        """How long the request may wait for admission and still be placed in time: the policy's
        answer where it predicts (`slo`, which raises its refusal at once when no plan could meet
        the SLO); no limit of its own for the others."""
        if not isinstance(self.policy, SloPolicy):
            return math.inf
        return self.policy.wait_budget_ms(shape, Pool(self.registry)) / 1000

    def replace_decode(self, shape: RequestShape, failed: Worker) -> Worker:
        """Another decode worker for a request whose decode worker failed mid-stream; it prefills
        prompt + output so far itself."""
        pool = Pool(self.registry, exclude=(failed,))
        others = pool.live(WorkerRole.DECODE)
        if not others:
            raise NoLiveWorker("decode workers", "the request's decode worker failed and no other is serving",
                               "start another decode worker")  # fmt: skip
        worker = min(others, key=lambda w: len(self.ledger.batch(w.worker_id)))
        self._book(shape, Placement(worker, None))
        self.prefilled(shape.request_id)  # it streams on at once: its first token is long sent
        return worker

    def moved(self, request_id: str, decode: Worker) -> None:
        """The request's KV went to another decode worker than placed (capacity.reserve)."""
        self.ledger.move_decode(request_id, decode.worker_id)

    def prefilled(self, request_id: str) -> None:
        if self._unqueue(request_id):
            self.registry.index.settle(request_id, self.registry.stale_after_s)
        self.ledger.prefilled(request_id)

    def ended(self, request_id: str, num_tokens: int = 0) -> None:
        """It left the mesh having generated `num_tokens` (its TPOT is scored against the forecast)."""
        if self._unqueue(request_id):  # ended before its first token: its worker may never hold it
            self.registry.index.drop(request_id)
        self.ledger.end(request_id, num_tokens)

    def _book(self, shape: RequestShape, placement: Placement) -> None:
        prefilling = placement.prefill or placement.decode
        self._unqueue(shape.request_id)  # placed again after a failed attempt
        queued = max(0, shape.uncached_tokens(prefilling))
        prefilling.queued_prefill_tokens += queued
        self._prefilling[shape.request_id] = (prefilling, queued)
        if self.marks:
            layout = prefilling.info.kv_layout
            hashes = shape.prompt.hashes(layout.model_fingerprint, layout.block_size)
            self.registry.index.expect(shape.request_id, prefilling.worker_id, layout, hashes)
        prefill_ms = placement.prefill_ms
        if prefill_ms is None:
            cached = shape.prompt.cached_tokens(prefilling)
            budget = prefilling.info.capacity.max_num_batched_tokens or DEFAULT_BUDGET_TOKENS
            prefill_ms = prefilling.predictors.step.prefill_ms(max(1, shape.prompt_tokens - cached), cached, budget)
        self.ledger.book(Booking(
            shape.request_id, shape.priority.rank, shape.prompt_tokens, shape.max_tokens, shape.tpot_ms, prefill_ms,
            prefilling.worker_id, placement.decode.worker_id, placed_at=self.registry.clock(),
            predicted_ttft_ms=placement.predicted_ttft_ms, predicted_tpot_ms=placement.predicted_tpot_ms,
        ))  # fmt: skip

    def _unqueue(self, request_id: str) -> bool:
        """Whether the request was waiting for its first token (now it is not)."""
        worker, queued = self._prefilling.pop(request_id, (None, 0))
        if worker is not None:
            worker.queued_prefill_tokens -= queued
        return worker is not None

    def _track(self, worker: Worker) -> None:
        self.ledger.track(worker.worker_id, decode=worker.role is WorkerRole.DECODE)
