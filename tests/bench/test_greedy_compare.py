"""The failure bench's oracle comparison: a near-tie flip is told apart from a wrong token, and a
wrong token is never excused as one."""

from __future__ import annotations

import math

from bench.greedy_compare import TIE_NATS, diverges, noise_nats
from bench.two_gpu_failures import Outcome, Scenario, judge

ORACLE = Outcome(tokens=[5, 6, 7, 8], logprobs=[-8.1, -7.9, -8.3, -8.0])


def scenario() -> Scenario:
    return Scenario("prefill-killed", 1, "prefill-0")


def test_the_same_tokens_do_not_diverge_and_their_noise_is_measured() -> None:
    got = [-8.1 + 2e-6, -7.9, -8.3 - 5e-6, -8.0]
    assert diverges(ORACLE.tokens, got, ORACLE.tokens, ORACLE.logprobs) is None
    assert math.isclose(noise_nats(ORACLE.tokens, got, ORACLE.tokens, ORACLE.logprobs), 5e-6, rel_tol=1e-3)


def test_a_flip_where_the_two_best_tokens_tie_is_a_near_tie() -> None:
    s = scenario()
    flipped = Outcome(tokens=[5, 6, 9, 3], logprobs=[-8.1 + 1e-6, -7.9 - 3e-6, -8.3 + 4e-6, -2.0])
    judge(s, [flipped], [ORACLE], deadline_s=60)
    assert s.outcomes == {"near_tie": 1} and not s.problems
    (m,) = s.mismatches
    assert (m["position"], m["near_tie"]) == (2, True) and m["at_nats"] < TIE_NATS


def test_a_token_chosen_far_below_the_oracles_best_is_wrong() -> None:
    """Corrupted KV: the logprobs move far beyond float32 noise, so no near-tie is claimed."""
    s = scenario()
    corrupted = Outcome(tokens=[5, 6, 9, 3], logprobs=[-8.1, -7.6, -6.0, -2.0])
    judge(s, [corrupted], [ORACLE], deadline_s=60)
    assert s.outcomes == {"wrong_tokens": 1}
    assert s.problems == ["requests not ok and not failed clearly: {'wrong_tokens': 1}"]
    assert s.mismatches[0]["near_tie"] is False


def test_a_tie_after_logprobs_that_already_drifted_is_wrong() -> None:
    s = scenario()
    drifted = Outcome(tokens=[5, 6, 9, 3], logprobs=[-8.1, -7.8, -8.3, -2.0])  # 0.1 nats off a token early
    judge(s, [drifted], [ORACLE], deadline_s=60)
    assert s.outcomes == {"wrong_tokens": 1}


def test_without_logprobs_a_flip_is_wrong_and_a_short_finish_parts_where_it_stopped() -> None:
    s = scenario()
    judge(s, [Outcome(tokens=[5, 6, 9, 3])], [ORACLE], deadline_s=60)
    assert s.outcomes == {"wrong_tokens": 1}
    short = diverges([5, 6], [-8.1, -7.9], ORACLE.tokens, ORACLE.logprobs)
    assert short is not None and short.position == 2 and short.at_nats == math.inf


def test_a_failed_request_may_stream_a_prefix_or_a_near_tie_but_nothing_else() -> None:
    s = scenario()
    prefix = Outcome(tokens=[5, 6], logprobs=[-8.1, -7.9], code="UNAVAILABLE", details="decode worker failed")
    tie = Outcome(tokens=[5, 6, 9], logprobs=[-8.1, -7.9, -8.3], code="UNAVAILABLE", details="decode worker failed")
    wrong = Outcome(tokens=[5, 4], logprobs=[-8.1, -5.0], code="UNAVAILABLE", details="decode worker failed")
    judge(s, [prefix, tie, wrong], [ORACLE] * 3, deadline_s=60)
    assert s.outcomes == {"failed_clearly": 2, "failed_after_wrong_tokens": 1}
    assert [m["near_tie"] for m in s.mismatches] == [True, False]
