"""The benchmark's arithmetic on hand-built requests, with exact expected figures.

A run of four requests is timed by hand; every percentile, TPOT, ITL, rate and goodput figure
the report would print is checked against the value worked out from the definitions.
"""

from __future__ import annotations

import pytest

from pdmesh.bench.metrics import RequestResult, Slo, max_load_meeting, summarize


def answered(index: int, start_s: float, chunks: list[tuple[float, int]], prompt_tokens: int = 10) -> RequestResult:
    """A successful request sent at start_s whose chunks (seconds after sending, tokens) arrived."""
    r = RequestResult(index=index, ok=True, prompt_tokens=prompt_tokens, start_s=start_s)
    for at_s, n in chunks:
        r.add_chunk(n, at_s)
    return r


def failed(index: int, start_s: float, after_s: float, code: str) -> RequestResult:
    return RequestResult(index=index, ok=False, prompt_tokens=10, start_s=start_s, e2e_s=after_s, code=code,
                         error=f"{code.lower()} here")  # fmt: skip


def test_one_request_ttft_itl_tpot_follow_the_definitions() -> None:
    # First token at 100 ms, one at 300 ms, then a chunk of three tokens at 600 ms.
    r = answered(0, 0.0, [(0.1, 1), (0.3, 1), (0.6, 3)])
    assert r.ttft_s == pytest.approx(0.1)
    assert r.e2e_s == pytest.approx(0.6)
    assert r.output_tokens == 5
    # The three-token chunk's 300 ms gap is spread over its tokens: ITLs sum to E2E - TTFT.
    assert r.itl_s == pytest.approx([0.2, 0.1, 0.1, 0.1])
    assert sum(r.itl_s) == pytest.approx(r.e2e_s - r.ttft_s)
    assert r.tpot_s == pytest.approx(0.5 / 4)


def test_a_chunk_without_tokens_changes_nothing() -> None:
    r = answered(0, 0.0, [(0.1, 1), (0.2, 1), (0.9, 0)])  # the finish chunk carries no token
    assert (r.e2e_s, r.output_tokens, r.itl_s) == (pytest.approx(0.2), 2, [pytest.approx(0.1)])


def test_a_one_token_answer_has_no_tpot() -> None:
    assert answered(0, 0.0, [(0.25, 1)]).tpot_s is None


def four_requests() -> list[RequestResult]:
    return [
        answered(0, 0.0, [(0.1, 1), (0.2, 1), (0.3, 1)]),  # TTFT 100, TPOT 100
        answered(1, 0.5, [(0.2, 1), (0.6, 1), (1.0, 1)]),  # TTFT 200, TPOT 400
        answered(2, 1.0, [(0.3, 1)]),  # TTFT 300, no TPOT; ends at 1.3 s
        failed(3, 1.5, 0.5, "UNAVAILABLE"),  # ends at 2.0 s: the run lasts 2 s
    ]


def test_summary_counts_rates_and_percentiles() -> None:
    m = summarize(four_requests())
    assert (m.requests, m.ok, m.failed, m.failed_by_code) == (4, 3, 1, {"UNAVAILABLE": 1})
    assert m.duration_s == pytest.approx(2.0)
    assert m.request_rate == pytest.approx(3 / 2.0)
    assert (m.total_output_tokens, m.total_input_tokens) == (7, 30)
    assert m.output_tokens_per_s == pytest.approx(7 / 2.0)
    # TTFT samples 100, 200, 300 ms; linear interpolation between order statistics.
    assert (m.ttft_ms.count, m.ttft_ms.mean, m.ttft_ms.p50) == (3, pytest.approx(200.0), pytest.approx(200.0))
    assert m.ttft_ms.p90 == pytest.approx(280.0)
    assert m.ttft_ms.p99 == pytest.approx(298.0)
    assert m.ttft_ms.max == pytest.approx(300.0)
    # TPOT: only the two requests with more than one token.
    assert (m.tpot_ms.count, m.tpot_ms.p50, m.tpot_ms.p99) == (2, pytest.approx(250.0), pytest.approx(397.0))
    # ITL: 100, 100 from request 0 and 400, 400 from request 1.
    assert (m.itl_ms.count, m.itl_ms.mean, m.itl_ms.p50) == (4, pytest.approx(250.0), pytest.approx(250.0))
    assert m.e2e_ms.p50 == pytest.approx(300.0)  # E2E 300, 1000, 300 ms
    assert m.errors == ["UNAVAILABLE: unavailable here"]
    assert m.send_lag_ms.count == 0  # a closed loop has no arrival times
    assert m.goodput is None  # no SLO given


def test_goodput_needs_both_slos_and_counts_failures_as_misses() -> None:
    results = four_requests()
    # TTFT <= 250 ms keeps requests 0 and 1; TPOT <= 200 ms drops request 1; request 2 has no TPOT
    # (one token) but misses TTFT; request 3 failed.
    g = summarize(results, Slo(ttft_ms=250, tpot_ms=200)).goodput
    assert g is not None
    assert (g.good, g.requests_per_s, g.attainment_pct) == (1, pytest.approx(0.5), pytest.approx(25.0))
    # A one-token answer meets any TPOT target.
    g = summarize(results, Slo(ttft_ms=300, tpot_ms=100)).goodput
    assert g is not None and (g.good, g.attainment_pct) == (2, pytest.approx(50.0))
    # Only a TTFT target.
    g = summarize(results, Slo(ttft_ms=1000)).goodput
    assert g is not None and g.good == 3


def test_send_lag_measures_how_late_open_loop_requests_left() -> None:
    early = answered(0, 0.5, [(0.1, 1)])
    early.scheduled_s = 0.5
    late = answered(1, 1.3, [(0.1, 1)])
    late.scheduled_s = 1.0  # waited 300 ms for a free slot
    m = summarize([early, late])
    assert (m.send_lag_ms.count, m.send_lag_ms.max) == (2, pytest.approx(300.0))


def test_an_empty_run_reports_zeros_not_errors() -> None:
    m = summarize([], Slo(ttft_ms=100))
    assert (m.requests, m.ok, m.duration_s, m.output_tokens_per_s, m.ttft_ms.p50) == (0, 0, 0.0, 0.0, None)
    assert m.goodput is not None and m.goodput.attainment_pct == 0.0


def test_goodput_is_the_highest_load_up_to_which_every_load_meets_the_target() -> None:
    # The two-H100 sweep of 2026-11-26 (disaggregated, slo policy): 10 req/s missed, 12 passed.
    assert max_load_meeting([(6, 100.0), (8, 98.9), (10, 76.7), (12, 97.8)], 90.0) == 8
    assert max_load_meeting([(12, 97.8), (6, 100.0), (8, 98.9)], 90.0) == 12  # order given does not matter
    assert max_load_meeting([(2, 85.0), (4, 95.0)], 90.0) is None  # the lowest load already misses
    assert max_load_meeting([], 90.0) is None
