"""bench/steady_rate.py reads a closed loop's pace with every slot in use from its records."""

from __future__ import annotations

import pytest

from bench.steady_rate import full_window, steady_rate, token_arrivals, whole_rate
from pdmesh.bench.metrics import RequestResult
from pdmesh.bench.plan import LoadMode, LoadPoint
from pdmesh.bench.score import SavedRun


def closed_loop(slots: int, waves: int, ttft: float, tokens: int, step: float) -> list[RequestResult]:
    """`waves` waves of `slots` requests: a request's slot refills as it ends; its first token
    comes `ttft` after sending (the first wave's queue adds `ttft` per earlier request), the rest
    one `step` apart."""
    results: list[RequestResult] = []
    for slot in range(slots):
        t = 0.0
        for wave in range(waves):
            first = ttft * (slot + 1) if wave == 0 else ttft
            e2e = first + step * (tokens - 1)
            results.append(RequestResult(index=len(results), ok=True, prompt_tokens=8, output_tokens=tokens,
                                         start_s=t, ttft_s=first, e2e_s=e2e))  # fmt: skip
            t += e2e
    return results


def test_the_window_starts_after_the_first_wave_and_ends_at_the_last_send() -> None:
    results = closed_loop(slots=4, waves=6, ttft=0.1, tokens=11, step=0.01)
    start, end = full_window(results, 4) or (0.0, 0.0)
    assert start == pytest.approx(0.4)  # the fourth request's first token
    assert end == max(r.start_s for r in results)


def test_the_steady_rate_excludes_the_ramp_and_the_drain() -> None:
    run = SavedRun("x.json", LoadPoint(LoadMode.CONCURRENCY, 4), closed_loop(4, 20, 0.1, 11, 0.01))
    steady = steady_rate(run)
    assert steady is not None
    rate, seconds, share = steady
    # In steady state a slot yields 11 tokens per 0.2 s (0.1 refill + 0.1 decoding): 4 slots, 220/s.
    assert rate == pytest.approx(220, rel=0.08)
    assert rate > whole_rate(run) and seconds > 0 and 0 < share < 1


def test_token_times_when_kept_are_used_as_they_are() -> None:
    r = RequestResult(index=0, ok=True, prompt_tokens=1, output_tokens=3, start_s=1.0, ttft_s=0.5, e2e_s=0.9,
                      token_times_s=[0.5, 0.6, 0.9])  # fmt: skip
    assert token_arrivals(r) == pytest.approx([1.5, 1.6, 1.9])
    r.token_times_s = []
    assert token_arrivals(r) == pytest.approx([1.5, 1.7, 1.9])  # spread evenly


def test_no_window_for_an_open_loop_or_a_single_wave() -> None:
    assert steady_rate(SavedRun("x", LoadPoint(LoadMode.RATE, 4), closed_loop(4, 3, 0.1, 5, 0.01))) is None
    assert full_window(closed_loop(4, 1, 0.1, 5, 0.01), 4) is None
