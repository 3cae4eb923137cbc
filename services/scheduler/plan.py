"""A plan of the `slo` policy (slo.py), which of the plans it weighed wins, and what a refusal
says of them: the forecasts, bounds and first failed check of the best, or that no idle worker
could meet the target (OUT_OF_RANGE: retrying will not help)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.step_samples import StepShape
from services.scheduler.forecast import Check, DecodeSide, Prefill, Request
from services.scheduler.margin import Bound, MarginSettings
from services.scheduler.policy import RequestShape
from services.status import SloOutOfReach


@dataclass(frozen=True, slots=True)
class Plan:
    prefill: Prefill
    decode: DecodeSide
    local: bool
    ttft_ms: float  # the mean forecasts (what the outcomes are scored against)
    tpot_ms: float
    ttft_bound_ms: float  # the TTFT forecast's upper bound: what the target is checked against
    ttft_margin: Bound  # the prefilling worker's margin the bound came from
    failed: Check | None  # the first check it failed; None: feasible

    @property
    def feasible(self) -> bool:
        return self.failed is None

    @property
    def unavoidable_ms(self) -> float:
        """The part of its TTFT no waiting removes: the prompt's steps, the push, the overhead."""
        return self.ttft_ms - max(self.prefill.wait_ms, self.decode.room_wait_ms)

    @property
    def idle_unavoidable_ms(self) -> float:
        """The same on an idle worker: what says a target can never be met (the model is fitted under
        the worker's current load; predictor.WorkerPredictors.idle_factor)."""
        alone = self.unavoidable_ms - self.prefill.duration_ms * (1 - 1 / self.prefill.pace)  # no neighbour's steps
        return alone * self.prefill.worker.predictors.idle_factor

    @property
    def cost_ms(self) -> float:
        return self.prefill.compute_ms + self.prefill.transfer_ms


def why(plan: Plan, request: Request, shape: RequestShape) -> str:
    """What a refusal says of the plan predicted to give the first token soonest: its forecasts and
    bounds against the targets, and which check refused it."""
    where = f"on {plan.decode.worker.worker_id}" if plan.local else (
        f"{plan.prefill.worker.worker_id} -> {plan.decode.worker.worker_id}"
    )  # fmt: skip
    full = f", its decode worker full for {plan.decode.room_wait_ms:.0f} ms" if plan.decode.room_wait_ms > 0 else ""
    tightest = plan.decode.batch.min_tpot_ms
    members = f", its batch's tightest target {tightest:g} ms" if tightest > 0 else ""
    refused = plan.failed.value if plan.failed is not None else "none failed"
    return (
        f"the best plan ({where}) predicts TTFT {plan.ttft_ms:.0f} ms (bound {plan.ttft_bound_ms:.0f} ms) and TPOT "
        f"{plan.tpot_ms:.1f} ms (step bound {plan.decode.step_bound_ms:.1f} ms) against targets "
        f"{request.ttft_ms:.0f} ms left / {shape.tpot_ms or 'none'} ms{members}{full}; refused because {refused}"
    )  # fmt: skip


def out_of_reach(
    shape: RequestShape, request: Request, plans: list[Plan], sides: list[DecodeSide], margins: MarginSettings
) -> SloOutOfReach | None:
    """The refusal of a target no idle worker could meet (mean forecasts, not bounds, scaled to an
    idle worker's pace: a worker slowed by load now is not "never"): the prompt's steps alone exceed
    the TTFT target on every plan, or a lone decode step exceeds the TPOT target on every decode
    worker. Only calibrated forecasts say "never": a guess refuses nothing. No forecast is bounded
    below the margins' floors, so a target under a floor is never met either, calibrated or not:
    the floor is configuration, not a forecast."""
    if shape.ttft_ms > 0 and plans:
        calibrated = all(p.prefill.calibrated for p in plans)
        fastest = min(p.idle_unavoidable_ms for p in plans) if calibrated else 0.0
        if max(fastest, margins.ttft_floor_ms) > shape.ttft_ms:
            why = (
                f"the fastest plan is predicted to need {fastest:.0f} ms for the prompt alone ({shape.prompt_tokens} "
                "tokens) even on an idle worker" if fastest > shape.ttft_ms
                else f"no first token is bounded below {margins.ttft_floor_ms:g} ms (the margins' floor)"
            )  # fmt: skip
            return SloOutOfReach(
                "slo.ttft_ms", f"is {shape.ttft_ms:g} ms, and {why}",
                f"allow at least {_whole_ms(max(fastest, margins.ttft_floor_ms))} ms or shorten the prompt; retrying "
                "will not help",
            )  # fmt: skip
    lone = StepShape(0, 0, 1, request.mean_context)
    if shape.tpot_ms > 0 and sides:
        alone = 0.0
        if all(side.worker.predictors.calibrated_for(lone) for side in sides):
            alone = min(side.worker.predictors.step.step_ms(lone) * side.worker.predictors.idle_factor
                        for side in sides)  # fmt: skip
        alone = max(margins.tpot_floor_ms, alone)  # no step is bounded below the floor
        if alone > shape.tpot_ms:
            return SloOutOfReach(
                "slo.tpot_ms", f"is {shape.tpot_ms:g} ms, and the fastest decode worker is predicted to take "
                f"{alone:.1f} ms per token even running this request alone",
                f"allow at least {_whole_ms(alone)} ms; retrying will not help",
            )  # fmt: skip
    return None


def local_on_shared_devices(plans: list[Plan]) -> list[Plan]:
    """The feasible plans, less the hand-offs to a prefill worker on the decode worker's own GPU
    where that decode worker has a feasible local plan and the prefill worker holds no more of the
    prompt. Such a hand-off buys no device time (one GPU computes the prompt either way) and costs
    what the processor-sharing forecast does not see: the push, and two busy contexts taking turns
    on the GPU. On an H100 (BENCHMARKS.md, "A shared GPU time-slices its workers"), 16 concurrent
    4k prompts under that forecast alone handed 31-34 of 80 off: the decode worker's steps took
    13.4 ms against 10.0 beside the prefill worker's prompts, TTFT p50 1.55x the colocated mesh's,
    against 1.00x with every prompt kept local. The hand-off stays where it is worth something:
    a prefix the prefill worker holds, or a local prefill the running batch's TPOT cannot absorb."""
    feasible = [p for p in plans if p.feasible]
    local_cached = {p.decode.worker.worker_id: p.prefill.cached_tokens for p in feasible if p.local}

    def kept(p: Plan) -> bool:
        device = p.decode.worker.info.device_id
        if p.local or not device or p.prefill.worker.info.device_id != device:
            return True
        cached = local_cached.get(p.decode.worker.worker_id)
        return cached is None or p.prefill.cached_tokens > cached

    return [p for p in feasible if kept(p)]


def choose(plans: list[Plan], tie_fraction: float, wait_weight: float) -> Plan | None:
    """Among the plans whose decode worker has room now (waiting for a full worker's members to
    leave only when every worker is full), the cheapest, counting beside its compute the time its
    first token comes later than the soonest plan's (times `wait_weight`); within `tie_fraction` of
    it, the most cached tokens, then the earliest first token, then the lightest decode batch."""
    plans = [p for p in plans if p.decode.room_wait_ms == 0] or plans
    if not plans:
        return None
    soonest = min(p.ttft_ms for p in plans)
    costs = [p.cost_ms + wait_weight * (p.ttft_ms - soonest + p.prefill.delay_ms) for p in plans]
    cheapest = min(costs)
    close = [p for p, cost in zip(plans, costs, strict=True) if cost <= cheapest * (1 + tie_fraction) + 1e-9]
    return min(close, key=_tie_break)


def _tie_break(p: Plan) -> tuple[float, float, float, str, str]:
    """More cached tokens, then an earlier first token, then a lighter decode batch; worker ids
    last, so a decision never depends on the order candidates were met in."""
    return (-p.prefill.cached_tokens, p.ttft_ms, p.decode.step_after_ms, p.decode.worker.worker_id,
            p.prefill.worker.worker_id)  # fmt: skip


def _whole_ms(ms: float) -> int:
    """The least whole number of milliseconds that is at least `ms`, float noise aside: a forecast
    fitted by least squares lands a hair off the exact figure (2100.0000000000005), and "allow at
    least 2101 ms" for a 2,100 ms need would be wrong by a millisecond the user cannot see."""
    return math.ceil(round(ms, 6))
