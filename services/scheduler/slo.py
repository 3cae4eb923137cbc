"""The `slo` policy: place each request on the cheapest plan predicted to meet its SLO, or refuse
it at once.

Design note. For a request the policy gathers candidate workers — the least loaded of each role
(the ledger's heaps: the k prefill workers whose queues empty soonest, the k decode workers with
the fastest predicted steps) and the workers holding the longest cached prefix of its prompt (the
registry's prefix index) — and forecasts every plan among them (forecast.py): a local prefill on
each decode candidate, and each prefill candidate handing off to each decode candidate of the same
KV layout. A plan is feasible when its TTFT meets the target, the decode worker holds the KV, and
no request on that decode worker (the new one included) is pushed past its TPOT target — each
judged on an upper bound, not the mean: the forecast times the worker's recent error margin
(margin.Margins, calibrated from the outcomes of the requests it admitted), so a worker whose
forecasts have lately run 40% short gets 40% more room. Time the request spent before placement
(tokenizing, the admission queue) comes off its TTFT target.

Among feasible plans the cheapest wins. A plan's cost is the compute it spends (so a worker holding
the prompt's prefix is cheap by itself) plus the time its first token comes later than the soonest
feasible plan's, times `wait_weight` (0.5: a millisecond the request waits weighs half a millisecond
of compute). Plans within `tie_fraction` of the cheapest are decided by prefix affinity (more cached
tokens), then the earlier first token.

Why the wait counts. With compute alone, a target every plan meets (the 30 s default of a request
that asks for none) let the cheaper worker take a whole burst however long its queue grew: 16
concurrent 4k prompts on 1 prefill + 1 decode worker queued on the prefill worker (its plan a few
ms cheaper than a local prefill on a decoding worker) while the decode worker could have started
half of them — TTFT p50 7–9x the colocated mesh's on an H200 (BENCHMARKS.md). Counting the wait
prices a queue in the one unit the cost already has: a worker holding the prefix keeps a burst
while its queue costs less than the compute it saves ("sticky until saturated"), and otherwise the
burst spreads. Why half: a millisecond of compute on a busy worker is also a millisecond for every
request queued behind it there, so it is worth more than one request's millisecond of waiting; at 1
the simulated Mooncake trace (8 + 8 H100s, TTFT 4 s / TPOT 100 ms) lost ~0.7 point of attainment at
its goodput knee in one seed of two, at 0.5 none in either, while a burst's plans — whose compute
differs by a few percent and whose waits by whole prompts — spread the same at either weight
(BENCHMARKS.md). The alternatives: a default TTFT target derived from the idle forecast would turn
"no SLO" into refusals or queueing cliffs at an arbitrary multiple; a latency tie-break within a
bounded cost premium keeps the flaw whenever the plans' costs differ by more than the premium (a
prefix hit), however long the queue. Running requests pay for a local prefill in stalled steps;
their TPOT targets bound that (forecast.stall_fits, which counts the local prefills already queued
on the worker: a burst of them, each fitting alone, must fit together), and requests without a TPOT
target accept the stall as the colocated mesh imposes it — the operator's default_tpot_ms protects
them.

Workers sharing a device. Two worker processes on one GPU time-slice it: a prompt prefilled by the
prefill worker is not extra capacity beside the decode worker, it takes the device's time from
that worker's steps. Each worker names its device (WorkerInfo.device_id: host and GPU UUID) and the
forecast models the device as the GPU runs it (forecast.DeviceLoad): each busy worker is a context
getting an equal share (processor sharing). A prompt on worker W waits for W's own queue only, and
that queue and the prompt run at the shared pace: a neighbour busy for b ms of its own work delays
x ms of W's by min(b, x), a neighbour holding a decode batch (its members decoding, or their
prompts on the way) by x. What a prompt takes from the neighbours counts too: when W's context
would otherwise leave the device to them, each neighbour's queued prompt that runs beside it ends
later by the overlap, and that delay weighs in the plan's cost as a wait of its own (wait_weight);
a prompt that rides the steps of a decode batch already stepping takes no one's share. A prompt on
the prefill worker stalls the decode batches on its GPU as a local prefill does, so their TPOT
budgets must absorb it (stall_fits). Why not one queue for the device (the rule before, H100,
BENCHMARKS.md): the prefill worker's queue then stood ahead of a prompt on either worker, the waits
tied, its cheaper compute won each time, and a 16-concurrent run of 4k prompts queued all 64 there
(TTFT 11x the colocated mesh's) while a local prompt would have run beside that queue at once.
Sequential prompts and bursts stay local as before (a hand-off to the idle prefill worker beside a
decode worker's queue gives its own first token sooner but delays each queued prompt as much); on
separate GPUs nothing changes. CPU workers name no device: each runs on threads of its own, the OS
runs them in parallel while the host has cores for them, and where it has not, every worker's
measured steps show it (engine/device_identity.py). The rule models the device rather than
forbidding hand-offs: a prefill worker on a shared GPU still takes a prompt whose prefix it holds
(more of it than the decode worker does), or one the decode worker's running batch cannot absorb.
A plan there that is merely forecast cheaper does not win (plan.local_on_shared_devices): processor
sharing is the ideal a GPU's time-slicing falls short of, and on an H100 the hand-offs it chose cost
a 4k burst's TTFT p50 1.55x the colocated mesh's.

Guesses refuse nothing. Without a configured profile the step models start from no samples, and
a forecast counts as evidence only where the samples have exercised it
(predictor.WorkerPredictors.calibrated_for: enough prompt steps for a prompt's, enough decode steps
for a decode step's). An uncalibrated forecast fails no check (but a target under the margins'
floors, which no forecast is bounded below) and is not scored into the margins: on a fresh mesh
the first requests were forecast ~0 ms, their outcomes taught the TPOT margin a 16x factor, and
for the next 30 s every plan's 15 ms step was bounded past a 50 ms target (77% of a sustainable
load refused in the simulator; 64 of 90 on two H100s). An infeasible plan names the first check it
failed (forecast.Check), and so does a refusal.

When no plan is feasible the request is refused at once with RESOURCE_EXHAUSTED and the soonest
time a plan is predicted to become feasible, rather than queued past its SLO; when even idle
workers could not meet it (the prompt alone takes longer than the TTFT target, a lone decode step
longer than the TPOT target), with OUT_OF_RANGE naming the target and the predicted best, since
retrying cannot help. The admission queue asks first (`wait_budget_ms`): a request is refused
before it queues, never after waiting out its SLO there.

Priorities: a request's queue wait counts only work of its priority or higher (the engines run
higher priorities first), so a lower priority never delays a higher one's first token. Targets a
request leaves at 0 take the configured defaults (Placer.shape).

Only the candidates are forecast, so a decision costs O(k^2 + prefix holders), not O(workers):
under 1 ms with 1,000 workers (pdmesh sim reports it). The workers left out are predicted no
better: they are the more loaded ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from engine.kv_layout import KVLayout
from pdmesh.config import PolicyName
from pdmesh.enums import WorkerRole
from services.scheduler.forecast import (
    Check,
    DecodeSide,
    DeviceLoad,
    Prefill,
    Request,
    decode_side,
    device_load,
    first_departure_ms,
    local_prefill,
    prefill_on,
    stall_fits,
)
from services.scheduler.ledger import DecodeBatch, Ledger
from services.scheduler.margin import Bound, Margins, MarginSettings, Outcome
from services.scheduler.plan import Plan, choose, local_on_shared_devices
from services.scheduler.plan import out_of_reach as plan_out_of_reach
from services.scheduler.plan import why as plan_why
from services.scheduler.policy import Placement, Pool, RequestShape, no_decode_worker
from services.scheduler.registry import Registry, Worker
from services.status import SloOutOfReach, SloUnattainable

_LATE_MS = 1e-6  # the TTFT left to a request that has already waited past its target: none meets it


@dataclass(frozen=True)
class SloSettings:
    candidates: int = 4  # least-loaded workers of each role forecast per request (beside prefix holders)
    overhead_ms: float = 0.0  # per request beyond its predicted steps and push (calls, hand-off)
    tie_fraction: float = 0.02  # plans whose costs differ by less than this share are a tie
    wait_weight: float = 0.5  # compute-ms one ms of the request's own wait beyond its soonest plan's costs
    kv_headroom: float = 0.1  # share of a decode worker's KV kept free (the reservation watermark)
    retry_min_s: float = 0.05  # bounds of the retry hint of a refusal
    retry_max_s: float = 60.0
    margins: MarginSettings = MarginSettings()  # the error margins forecasts are bounded by


class SloPolicy:
    name = PolicyName.SLO

    def __init__(self, registry: Registry, ledger: Ledger, settings: SloSettings) -> None:
        self.registry = registry
        self.ledger = ledger
        self.settings = settings
        self.margins = ledger.margins = Margins(settings.margins, ledger.clock)
        ledger.batch_key = self._batch_key

    def place(self, shape: RequestShape, pool: Pool) -> Placement:
        now = self.registry.clock()
        request = self._request(shape, now)
        plans, sides = self._plans(shape, request, pool, now)
        best = choose(local_on_shared_devices(plans), self.settings.tie_fraction, self.settings.wait_weight)
        if best is None:
            raise self._refusal(shape, request, plans, sides, now)
        return Placement(
            best.decode.worker, None if best.local else best.prefill.worker,
            # An uncalibrated forecast is a guess: scoring it would teach the margins the model's
            # ignorance (a 0 ms guess measured at 16 ms read as "16x too short" for 30 s), not its error.
            predicted_ttft_ms=best.ttft_ms if best.prefill.calibrated else None,
            predicted_tpot_ms=best.tpot_ms if best.decode.calibrated else None,
            cost_ms=best.cost_ms, cached_tokens=best.prefill.cached_tokens,
            # Queues hold work at the worker's own pace: a forecast on a shared device paces it itself.
            prefill_ms=best.prefill.duration_ms / best.prefill.pace,
        )  # fmt: skip

    def wait_budget_ms(self, shape: RequestShape, pool: Pool) -> float:
        """How long the request may wait before placement (in the admission queue, for a decode
        slot) and still meet its TTFT: the most slack of its feasible plans, counting the wait for a
        slot they already predict. Raises the refusal at once when no plan is feasible."""
        now = self.registry.clock()
        request = self._request(shape, now)
        plans, sides = self._plans(shape, request, pool, now)
        feasible = local_on_shared_devices(plans)
        if not feasible:
            raise self._refusal(shape, request, plans, sides, now)
        if request.ttft_ms <= 0:
            return math.inf
        return max(max(0.0, request.ttft_ms - p.ttft_bound_ms + p.decode.room_wait_ms) for p in feasible)

    def _request(self, shape: RequestShape, now: float) -> Request:
        """What a forecast needs of the request; its TTFT target less the time since it arrived."""
        ttft = shape.ttft_ms
        if ttft > 0 and shape.received_at is not None:
            ttft = max(_LATE_MS, ttft - max(0.0, now - shape.received_at) * 1000)
        return Request(shape.prompt_tokens, shape.max_tokens, shape.priority.rank, ttft, shape.tpot_ms)

    # -- candidates and plans ---------------------------------------------------------------------

    def _plans(
        self, shape: RequestShape, request: Request, pool: Pool, now: float
    ) -> tuple[list[Plan], list[DecodeSide]]:
        """A local plan per decode candidate, and per prefill candidate its best hand-off: to the
        decode candidate with the fastest predicted step that can take it (hand-offs to the same
        prefill worker differ only in that)."""
        k = self.settings.candidates
        decode_cached = self._holders(shape, pool, WorkerRole.DECODE)
        prefill_cached = self._holders(shape, pool, WorkerRole.PREFILL)
        decode = _union(self._least(pool, WorkerRole.DECODE, k), decode_cached)
        prefill = _union(self._least(pool, WorkerRole.PREFILL, k), prefill_cached)
        if not decode:
            raise no_decode_worker()
        devices = {w: self._device(w, now) for w in (*decode, *prefill)}
        sides = [decode_side(w, self.ledger, request, now, self.settings.kv_headroom, devices[w]) for w in decode]
        plans = [self._local(side, request, decode_cached.get(side.worker, 0), now) for side in sides]
        by_layout: dict[KVLayout, list[DecodeSide]] = {}  # a prefill worker hands off within its layout
        for side in sorted(sides, key=lambda side: side.step_after_ms):
            by_layout.setdefault(side.worker.info.kv_layout, []).append(side)
        for worker in prefill:
            p = prefill_on(worker, self.ledger, request, prefill_cached.get(worker, 0), now, devices[worker])
            stalled = [side for side in sides if side.worker in self._sharing(worker)]
            plan = self._handoff(p, by_layout.get(worker.info.kv_layout, []), request, stalled, now)
            if plan is not None:
                plans.append(plan)
        return plans, sides

    def _sharing(self, worker: Worker) -> list[Worker]:
        return self.registry.sharing(worker)

    def _device(self, worker: Worker, now: float) -> DeviceLoad:
        """What the workers sharing its device (a GPU time-slices them) put on it."""
        return device_load(worker, self._sharing(worker), self.ledger, now)

    def _least(self, pool: Pool, role: WorkerRole, k: int) -> list[Worker]:
        heap = self.ledger.by_batch if role is WorkerRole.DECODE else self.ledger.by_queue
        ids = heap.smallest(k, lambda worker_id: pool.usable(worker_id, role) is not None)
        return [self.registry.workers[worker_id] for worker_id in ids]

    def _holders(self, shape: RequestShape, pool: Pool, role: WorkerRole) -> dict[Worker, int]:
        """Usable workers of `role` holding a prefix of the prompt (the prefix index), with the
        tokens they hold; the k longest."""
        found: dict[Worker, int] = {}
        for layout in self.registry.layouts:
            match = shape.prompt.match(layout)
            for location, blocks in match.blocks.items():
                worker = pool.usable(location, role)
                if worker is not None and blocks and worker.info.kv_layout == layout:
                    found[worker] = min(blocks * match.block_size, shape.prompt_tokens - 1)
        longest = sorted(found.items(), key=lambda item: (-item[1], item[0].worker_id))[: self.settings.candidates]
        return dict(longest)

    def _ttft_ms(self, prefill: Prefill, side: DecodeSide) -> float:
        """Its queue and the decode worker's room (a full worker: the reservation or the engine
        waits for members to leave) overlap; then the prompt's steps, the push, the overhead."""
        start = max(prefill.wait_ms, side.room_wait_ms)
        return start + prefill.duration_ms + prefill.transfer_ms + self.settings.overhead_ms

    def _ttft_margin(self, worker: Worker) -> Bound:
        """The worker's TTFT margin: what turns its forecasts into bounds of what it delivers."""
        return self.margins.bound(Outcome.TTFT, worker.worker_id, worker.predictors.relative_error)

    def _local(self, side: DecodeSide, request: Request, cached: int, now: float) -> Plan:
        prefill = local_prefill(side, request, cached)
        ttft = self._ttft_ms(prefill, side)
        margin = self._ttft_margin(side.worker)
        bound = margin.ms(ttft)
        failed = _failure(side, request, bound, prefill, margin)
        if failed is None and not stall_fits(side, prefill, now, margin.slope):
            failed = Check.STALL
        return Plan(prefill, side, True, ttft, side.step_after_ms, bound, margin, failed)

    def _handoff(
        self, prefill: Prefill, sides: list[DecodeSide], request: Request, stalled: list[DecodeSide], now: float
    ) -> Plan | None:
        """The hand-off to the first of `sides` (fastest step first) that can take the request in
        time; else, infeasible, to the one giving the earliest first token (a refusal reads it). The
        decode batches on the prefill worker's own device (`stalled`) pay for its prompt as for a
        local prefill: their TPOT targets must absorb the stall."""
        fallback: Plan | None = None
        margin = self._ttft_margin(prefill.worker)
        stall_ok = all(stall_fits(side, prefill, now, margin.slope) for side in stalled)
        for side in sides:
            ttft = self._ttft_ms(prefill, side)
            bound = margin.ms(ttft)
            # Local prefills still queued on the decode worker when the request joins stall its decode.
            stall = max(0.0, side.local_wait_ms - ttft)
            failed = _failure(side, request, bound, prefill, margin, stall)
            if failed is None and not stall_ok:
                failed = Check.STALL
            tpot = side.step_after_ms + stall / max(1, request.max_tokens - 1)
            plan = Plan(prefill, side, False, ttft, tpot, bound, margin, failed)
            if failed is None:
                return plan
            if fallback is None or bound < fallback.ttft_bound_ms:
                fallback = plan
        return fallback

    # -- refusals ---------------------------------------------------------------------------------

    def _refusal(
        self, shape: RequestShape, request: Request, plans: list[Plan], sides: list[DecodeSide], now: float
    ) -> SloUnattainable | SloOutOfReach:
        s = self.settings
        out_of_reach = plan_out_of_reach(shape, request, plans, sides, self.margins.settings)
        if out_of_reach is not None:
            return out_of_reach
        # A retry comes with its whole TTFT target again.
        soonest = self._soonest_ms(dataclasses.replace(request, ttft_ms=shape.ttft_ms), plans, sides, now)
        best = min(plans, key=lambda p: p.ttft_bound_ms, default=None)
        why = "no worker is live for it" if best is None else plan_why(best, request, shape)
        if math.isinf(soonest):
            return SloOutOfReach(
                "slo", f"no plan can meet the request's SLO, even on idle workers: {why}",
                "relax slo.ttft_ms or slo.tpot_ms, or shorten the prompt; retrying will not help",
            )  # fmt: skip
        retry_s = min(s.retry_max_s, max(s.retry_min_s, soonest / 1000))
        return SloUnattainable(
            "slo", f"no plan meets the request's SLO now: {why}",
            f"retry in {retry_s:.2f} s, relax ttft_ms or tpot_ms, or add workers", retry_after_s=retry_s,
        )  # fmt: skip

    def _soonest_ms(self, request: Request, plans: list[Plan], sides: list[DecodeSide], now: float) -> float:
        """When some plan is predicted to become feasible: its queue drained by the TTFT bound's
        excess, and its decode worker able to take the request (the first of its batch gone: KV and
        step time freed). A plan that would be late even with an empty queue only by its worker's
        margin (the mean forecast fits) is worth retrying after about one TTFT target, by when that
        margin has seen more outcomes. Never (inf), when even an empty queue leaves every mean
        forecast late."""
        decode_wait = {
            id(side): 0.0 if side.fits and side.tpot_ok(request) else first_departure_ms(side, now) for side in sides
        }
        any_decode = min(decode_wait.values(), default=math.inf)
        soonest = math.inf
        for plan in plans:
            if request.ttft_ms > 0 and plan.idle_unavoidable_ms > request.ttft_ms:
                continue  # the prompt alone is too slow on this worker, even idle
            margin = plan.ttft_margin
            late = max(0.0, plan.ttft_bound_ms - request.ttft_ms) / margin.slope if request.ttft_ms > 0 else 0.0
            if request.ttft_ms > 0 and margin.ms(plan.unavoidable_ms) > request.ttft_ms:
                late = request.ttft_ms  # no drain is enough under the margin as it stands
            decode = decode_wait[id(plan.decode)] if plan.local else any_decode
            if late == 0 and decode == 0 and not plan.feasible:
                # In time and with room, yet a stall would push someone past its TPOT: a local prefill
                # waits for a member to leave, a hand-off for the decode worker's own prefills.
                decode = first_departure_ms(plan.decode, now) if plan.local else plan.decode.local_wait_ms
            soonest = min(soonest, max(late, decode))
        return soonest

    def _batch_key(self, worker_id: str, batch: DecodeBatch) -> float:
        """A decode worker's load for the heap: its predicted step time now."""
        worker = self.registry.workers.get(worker_id)
        if worker is None:
            return float(len(batch))
        return worker.predictors.step.decode_step_ms(len(batch), batch.context_tokens)


def _failure(
    side: DecodeSide, request: Request, ttft_bound_ms: float, prefill: Prefill, margin: Bound, stall_ms: float = 0.0
) -> Check | None:
    """The first check a plan fails of those every plan takes (room, TTFT, TPOT), or None.

    The TTFT check rests on the prompt's forecast (its queue was booked from such forecasts too);
    when that is a guess (predictor.WorkerPredictors.calibrated_for) the plan is held only to what
    does not rest on it: the wait for room on the decode worker, a decode forecast, when that one
    is calibrated. A guess is no reason to refuse; the steps of what is admitted calibrate it. A
    target under the margins' floor fails whatever the forecast: no bound is ever below the floor."""
    if not side.fits:
        return Check.ROOM
    if request.ttft_ms > 0:
        if ttft_bound_ms > request.ttft_ms and (prefill.calibrated or margin.floor_ms > request.ttft_ms):
            return Check.TTFT
        if side.calibrated and side.room_wait_ms > 0 and margin.ms(side.room_wait_ms) > request.ttft_ms:
            return Check.FULL
    return side.tpot_failure(request, stall_ms)


def _union(least: list[Worker], holders: dict[Worker, int]) -> list[Worker]:
    return list(dict.fromkeys([*holders, *least]))
