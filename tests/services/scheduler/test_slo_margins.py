"""The `slo` policy's error margins: forecasts are checked against targets as calibrated upper
bounds learnt from outcomes (services/scheduler/margin.py), time spent before placement comes off
the TTFT target, and the admission queue learns at once how long a request may wait.

Hand-built clusters (slo_cluster.py: a step costs 10 ms + 0.1 ms per prompt token + 0.1 ms per
decode row, a push 5 ms) and synthetic residuals, so every expectation is worked out by hand.
"""

from __future__ import annotations

import pytest
from slo_cluster import Cluster

from pdmesh.enums import ExecutionPlan
from services.scheduler.margin import Margins, MarginSettings, Outcome
from services.status import SloUnattainable


def scores(margins: Margins, kind: Outcome, worker: str, *ratios: float, predicted_ms: float = 1000.0) -> None:
    """Outcomes whose measured time was `ratio` times the forecast."""
    for ratio in ratios:
        margins.observe(kind, worker, predicted_ms, ratio * predicted_ms)


def test_the_factor_is_the_conformal_quantile_of_the_workers_recent_scores() -> None:
    margins = Margins(MarginSettings(quantile=0.9, window=64, min_samples=8))
    scores(margins, Outcome.TTFT, "p0", *(1.0 + 0.05 * i for i in range(19)))  # 1.00, 1.05 ... 1.90

    # ceil((19 + 1) x 0.9) = the 18th smallest of 19.
    assert margins.factor(Outcome.TTFT, "p0") == pytest.approx(1.85)
    assert margins.bound_ms(Outcome.TTFT, "p0", 2000.0) == pytest.approx(3700.0)
    scores(margins, Outcome.TTFT, "p0", *[1.2] * 64)  # only the last 64 count: the old ones are gone
    assert margins.factor(Outcome.TTFT, "p0") == pytest.approx(1.2)


def test_few_own_scores_take_the_pooled_ones_and_none_the_models_error() -> None:
    margins = Margins(MarginSettings(quantile=0.5, min_samples=8))
    assert margins.factor(Outcome.TTFT, "p0", model_error=0.2) == pytest.approx(1 + 1.645 * 0.2)
    scores(margins, Outcome.TTFT, "p0", *[2.0] * 8)
    scores(margins, Outcome.TTFT, "p1", 1.0, 1.0)  # two of its own: too few

    assert margins.factor(Outcome.TTFT, "p1") == pytest.approx(2.0)  # the pool: 8 x 2.0 and 2 x 1.0
    assert margins.factor(Outcome.TPOT, "p0", model_error=0.1) == pytest.approx(1.1645)  # TPOT: none yet


def test_a_tiny_ttft_forecast_is_scored_against_the_floor() -> None:
    margins = Margins(MarginSettings(ttft_floor_ms=50.0))
    margins.observe(Outcome.TTFT, "p0", 5.0, 60.0)  # the calls around a cached prompt, not a 12x error

    assert margins.recent(Outcome.TTFT, "p0") == [pytest.approx(1.2)]


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
    assert margins.recent(Outcome.TTFT, "decode-0") == [pytest.approx(1.5)]
    assert margins.recent(Outcome.TPOT, "decode-0") == [pytest.approx(100 / 9 / 10.1)]


def test_a_worker_whose_forecasts_ran_long_is_passed_over_for_one_whose_forecasts_held() -> None:
    # Without margins a 2000-token prompt is cheapest prefilled locally (210 ms against 215 handed
    # off). decode-0's first tokens have come 1.5x later than forecast: 315 ms, past a 300 ms target.
    cluster = Cluster(prefill=1, decode=1)
    scores(cluster.ledger.margins, Outcome.TTFT, "decode-0", *[1.5] * 8)
    scores(cluster.ledger.margins, Outcome.TTFT, "prefill-0", *[1.0] * 8)

    placement = cluster.place(2000, ttft_ms=300)

    assert placement.plan is ExecutionPlan.DISAGGREGATED
    assert placement.prefill is not None and placement.prefill.worker_id == "prefill-0"
    assert placement.predicted_ttft_ms == pytest.approx(215.0)  # the mean forecast, what outcomes are scored on


def test_when_every_margin_puts_the_target_out_of_reach_the_refusal_says_retry_after_one_target() -> None:
    cluster = Cluster(prefill=1, decode=1)
    scores(cluster.ledger.margins, Outcome.TTFT, "decode-0", *[1.5] * 8)
    scores(cluster.ledger.margins, Outcome.TTFT, "prefill-0", *[1.5] * 8)

    with pytest.raises(SloUnattainable) as refused:
        cluster.place(2000, ttft_ms=300)  # bounds 315 and 322.5 ms; the means (210, 215) would fit

    assert refused.value.retry_after_s == pytest.approx(0.3)
    assert cluster.place(2000, ttft_ms=330).plan is ExecutionPlan.LOCAL_PREFILL  # 315 fits 330


def test_a_decode_worker_whose_steps_ran_long_is_passed_over_for_a_tpot_target() -> None:
    # One row steps 10.1 ms. decode-0's requests have seen 1.2x that (12.1 ms > 11); decode-1's held.
    cluster = Cluster(prefill=0, decode=2)
    scores(cluster.ledger.margins, Outcome.TPOT, "decode-0", *[1.2] * 8)
    scores(cluster.ledger.margins, Outcome.TPOT, "decode-1", *[1.0] * 8)

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
