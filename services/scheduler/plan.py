"""A plan of the `slo` policy (slo.py) and what a refusal says of the plans it weighed: the
forecasts, bounds and first failed check of the best, or that no idle worker could meet the target
(OUT_OF_RANGE: retrying will not help)."""

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
                f"allow at least {math.ceil(max(fastest, margins.ttft_floor_ms))} ms or shorten the prompt; retrying "
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
                f"allow at least {math.ceil(alone)} ms; retrying will not help",
            )  # fmt: skip
    return None
