"""The `slo` policy's error margins: forecasts are checked against targets as upper bounds learnt
from outcomes (services/scheduler/margin.py: a correction, then a conformal quantile), time spent
before placement comes off the TTFT target, and the admission queue learns at once how long a
request may wait.

Hand-built clusters (slo_cluster.py: a step costs 10 ms + 0.1 ms per prompt token + 0.1 ms per
decode row, a push 5 ms) and synthetic residuals, so every expectation is worked out by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from slo_cluster import Cluster

from pdmesh.enums import ExecutionPlan
from services.scheduler.margin import Bound, Margins, MarginSettings, Outcome
from services.status import SloUnattainable


def outcomes(margins: Margins, kind: Outcome, worker: str, late_ms: float, count: int = 8) -> None:
    """`count` outcomes, forecasts 100, 200, ... ms, each measured `late_ms` later than forecast."""
    for i in range(1, count + 1):
        margins.observe(kind, worker, 100.0 * i, 100.0 * i + late_ms)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_bound_corrects_the_cost_every_request_pays_beyond_its_forecast() -> None:
    # Every first token came 200 ms (the calls around it) after its forecast: no noise, factor 1.
    margins = Margins(MarginSettings(quantile=0.9), Clock())
    for forecast in range(100, 2000, 100):
        margins.observe(Outcome.TTFT, "p0", forecast, forecast + 200.0)

    assert margins.bound(Outcome.TTFT, "p0") == Bound(200.0, 1.0, 50.0)
    # A 3 s forecast: 3.2 s, not 3 s times the 3x of the 100 ms forecasts that took 300 ms.
    assert margins.bound_ms(Outcome.TTFT, "p0", 3000.0) == pytest.approx(3200.0)


def test_the_factor_is_the_conformal_quantile_of_measured_over_corrected() -> None:
    # Twenty 1 s forecasts measured 1.2 s x (1 - d) and x (1 + d), d = 0, 0.05 ... 0.45: the median
    # excess is 200 ms and the ratios 0.55 ... 1.45. ceil((20 + 1) x 0.9) = the 19th of 20: 1.40.
    margins = Margins(MarginSettings(quantile=0.9), Clock())
    for i in range(10):
        for r in (1 - 0.05 * i, 1 + 0.05 * i):
            margins.observe(Outcome.TTFT, "p0", 1000.0, 1200.0 * r)

    assert margins.bound(Outcome.TTFT, "p0") == Bound(pytest.approx(200.0), pytest.approx(1.40), 50.0)
    assert margins.bound_ms(Outcome.TTFT, "p0", 3000.0) == pytest.approx(1.4 * 3200)
    for forecast in range(100, 6500, 100):  # 64 newer outcomes, 100 ms late each: the old ones are gone
        margins.observe(Outcome.TTFT, "p0", forecast, forecast + 100.0)
    assert margins.bound_ms(Outcome.TTFT, "p0", 3000.0) == pytest.approx(3100.0)


def test_outcomes_older_than_the_horizon_are_forgotten() -> None:
    clock = Clock()
    margins = Margins(MarginSettings(horizon_s=30.0), clock)
    outcomes(margins, Outcome.TTFT, "p0", late_ms=5000.0)  # an overload, now past
    assert margins.bound_ms(Outcome.TTFT, "p0", 1000.0) == pytest.approx(6000.0)

    clock.now = 30.5
    assert margins.bound_ms(Outcome.TTFT, "p0", 1000.0) == pytest.approx(1000.0)  # back to the model's own
    assert margins.recent(Outcome.TTFT, "p0") == []


def test_an_outcome_expires_a_horizon_after_its_forecast_was_made_not_after_it_came() -> None:
    clock = Clock()
    margins = Margins(MarginSettings(horizon_s=30.0), clock)
    clock.now = 25.0  # first tokens of requests placed at 0 that came 25 s late
    for i in range(1, 9):
        margins.observe(Outcome.TTFT, "p0", 100.0 * i, 25_000.0, made_at=0.0)
    assert margins.bound_ms(Outcome.TTFT, "p0", 1000.0) > 20_000

    clock.now = 30.5  # 30 s after they were placed: what they say of the mesh is that old
    assert margins.recent(Outcome.TTFT, "p0") == []
    assert margins.bound_ms(Outcome.TTFT, "p0", 1000.0) == pytest.approx(1000.0)


def test_after_a_cold_start_the_bound_recovers_once_forecasts_made_under_a_margin_hold() -> None:
    # A fresh mesh admits a burst on the stand-in (no outcomes yet); its first tokens come 2 s late.
    clock = Clock()
    margins = Margins(MarginSettings(min_samples=8), clock)
    for i in range(10):
        clock.now = 1.0 + i  # placed at 0 .. 0.9 s, each forecast 100 ms
        margins.observe(Outcome.TTFT, "p0", 100.0, 2100.0, made_at=0.1 * i)
    late = margins.bound_ms(Outcome.TTFT, "p0", 100.0)
    assert late == pytest.approx(2100.0)  # learnt at once: admission slows down

    # Requests placed from t = 11 s under that margin: the forecasts held, 20 ms of calls on top.
    for i in range(7):
        clock.now = 12.0 + i
        margins.observe(Outcome.TTFT, "p0", 100.0, 120.0, made_at=11.0 + 0.1 * i)
        assert margins.bound_ms(Outcome.TTFT, "p0", 100.0) > 2000  # seven: not yet evidence enough
    clock.now = 19.0
    margins.observe(Outcome.TTFT, "p0", 100.0, 120.0, made_at=11.7)
    # Eight made under a margin: the burst's no longer count (they would for 30 s after placement).
    assert margins.bound(Outcome.TTFT, "p0") == Bound(20.0, 1.0, 50.0)
    assert margins.bound_ms(Outcome.TTFT, "p0", 100.0) == pytest.approx(120.0)
    assert len(margins.recent(Outcome.TTFT, "p0")) == 18


def test_few_own_outcomes_take_the_pooled_ones_and_none_the_models_error() -> None:
    margins = Margins(MarginSettings(min_samples=8), Clock())
    assert margins.bound_ms(Outcome.TTFT, "p0", 1000.0, model_error=0.2) == pytest.approx(1000 * (1 + 1.645 * 0.2))
    outcomes(margins, Outcome.TTFT, "p0", late_ms=300.0)

    assert margins.bound_ms(Outcome.TTFT, "p1", 1000.0) == pytest.approx(1300.0)  # none of its own: the pool
    assert margins.bound_ms(Outcome.TPOT, "p0", 10.0, model_error=0.1) == pytest.approx(11.645)  # no TPOT yet


def test_a_model_that_overestimates_lowers_the_factor_never_adds_a_negative_cost() -> None:
    margins = Margins(MarginSettings(quantile=0.5), Clock())
    for i in range(1, 9):
        margins.observe(Outcome.TTFT, "p0", 100.0 * i, 80.0 * i)  # everything came in at 80% of its forecast

    assert margins.bound(Outcome.TTFT, "p0") == Bound(0.0, pytest.approx(0.8), 50.0)


def test_no_ttft_forecast_is_bounded_below_the_floor() -> None:
    assert Bound(factor=1.2, floor_ms=50.0).ms(5.0) == pytest.approx(60.0)


def test_first_tokens_and_ends_score_the_forecasts_made_at_placement() -> None:
    cluster = Cluster(prefill=0, decode=1)
    placement = cluster.place(2000, max_tokens=10)  # TTFT 210 ms, TPOT 10.1 ms predicted
    request_id = next(iter(cluster.ledger.bookings))

    cluster.now += 0.315
    cluster.placer.prefilled(request_id)
    cluster.now += 0.1  # nine more tokens in 100 ms: 11.1 ms each
    cluster.placer.ended(request_id, num_tokens=10)

    assert (placement.predicted_ttft_ms, placement.predicted_tpot_ms) == (pytest.approx(210.0), pytest.approx(10.1))
    margins = cluster.ledger.margins
    assert margins.recent(Outcome.TTFT, "decode-0") == [(pytest.approx(210.0), pytest.approx(315.0))]
    assert margins.recent(Outcome.TPOT, "decode-0") == [(pytest.approx(10.1), pytest.approx(100 / 9))]


def test_a_worker_whose_forecasts_ran_long_is_passed_over_for_one_whose_forecasts_held() -> None:
    # Without margins a 2000-token prompt is cheapest prefilled locally (210 ms against 215 handed
    # off). decode-0's first tokens have come 100 ms after their forecasts: 310 ms, past a 300 ms target.
    cluster = Cluster(prefill=1, decode=1)
    outcomes(cluster.ledger.margins, Outcome.TTFT, "decode-0", late_ms=100.0)
    outcomes(cluster.ledger.margins, Outcome.TTFT, "prefill-0", late_ms=0.0)

    placement = cluster.place(2000, ttft_ms=300)

    assert placement.plan is ExecutionPlan.DISAGGREGATED
    assert placement.prefill is not None and placement.prefill.worker_id == "prefill-0"
    assert placement.predicted_ttft_ms == pytest.approx(215.0)  # the mean forecast, what outcomes are scored on


def test_when_every_margin_puts_the_target_out_of_reach_the_refusal_says_retry_after_one_target() -> None:
    cluster = Cluster(prefill=1, decode=1)
    outcomes(cluster.ledger.margins, Outcome.TTFT, "decode-0", late_ms=100.0)
    outcomes(cluster.ledger.margins, Outcome.TTFT, "prefill-0", late_ms=100.0)

    with pytest.raises(SloUnattainable) as refused:
        cluster.place(2000, ttft_ms=300)  # bounds 310 and 315 ms; the means (210, 215) would fit

    assert refused.value.retry_after_s == pytest.approx(0.3)
    assert cluster.place(2000, ttft_ms=330).plan is ExecutionPlan.LOCAL_PREFILL  # 310 fits 330


def test_a_decode_worker_whose_steps_ran_long_is_passed_over_for_a_tpot_target() -> None:
    # One row steps 10.1 ms. decode-0's requests have seen 2 ms more (12.1 ms > 11); decode-1's held.
    cluster = Cluster(prefill=0, decode=2)
    outcomes(cluster.ledger.margins, Outcome.TPOT, "decode-0", late_ms=2.0)
    outcomes(cluster.ledger.margins, Outcome.TPOT, "decode-1", late_ms=0.0)

    assert cluster.place(100, tpot_ms=11.0).decode.worker_id == "decode-1"
    assert cluster.place(100, tpot_ms=13.0).decode.worker_id == "decode-0"  # both fit: the id breaks the tie


def test_time_spent_before_placement_comes_off_the_ttft_target() -> None:
    cluster = Cluster(prefill=0, decode=1)

    with pytest.raises(SloUnattainable):
        cluster.place(2000, ttft_ms=300, waited_s=0.15)  # 150 ms left; the prompt takes 210
    assert cluster.place(2000, ttft_ms=300, waited_s=0.05).predicted_ttft_ms == pytest.approx(210.0)


def test_the_admission_queue_learns_how_long_a_request_may_wait_or_is_refused_at_once() -> None:
    cluster = Cluster(prefill=0, decode=1)

    # A 1 s target, a 210 ms prompt on an idle worker: 790 ms to spare.
    assert cluster.placer.wait_budget_s(cluster.shape(2000, ttft_ms=1000)) == pytest.approx(0.79)
    cluster.running("decode-0", 4, tpot_ms=12.0)  # its local prefill's stall would break their TPOT
    with pytest.raises(SloUnattainable) as refused:
        cluster.placer.wait_budget_s(cluster.shape(2000, ttft_ms=1000))
    assert refused.value.retry_after_s == pytest.approx(1.04)  # when the first of the four leaves
    assert len(cluster.ledger.bookings) == 4  # asking books nothing


PLACE_TWELVE = """
import sys
from slo_cluster import Cluster

cluster = Cluster(prefill=1, decode=1)
for i in range(12):
    shape = cluster.shape(100 + i, ttft_ms=5000)
    before = set(sys.modules)
    cluster.placer.place(shape)
    print(i + 1, *sorted(set(sys.modules) - before))
    cluster.now += 0.2
    cluster.placer.prefilled(shape.request_id)
    cluster.now += 0.5
    cluster.placer.ended(shape.request_id, 10)
"""


def test_no_placement_imports_a_module_the_first_learnt_margin_included() -> None:
    # The 9th request is the first placed on margins learnt from outcomes (min_samples 8): its
    # np.median once imported numpy.ma in the middle of the placement, 39-65 ms of one request's
    # TTFT once per scheduler. A fresh interpreter, since this one has imported everything by now.
    here = Path(__file__).parent
    run = subprocess.run([sys.executable, "-c", PLACE_TWELVE], cwd=here, capture_output=True, text=True, check=True)

    assert run.stdout.split("\n")[:12] == [str(i) for i in range(1, 13)]
