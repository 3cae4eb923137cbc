"""The `slo` policy on hand-built cluster states: which plan it picks, when it refuses, and how
priorities order admission.

The cluster (slo_cluster.py): a step costs 10 ms, plus 0.1 ms per prompt token and 0.1 ms per
decode row (attention and context free); a KV push costs 5 ms. Prompts of up to 2048 tokens take
one step (the budget).
"""

from __future__ import annotations

import pytest
from slo_cluster import Cluster

from pdmesh.enums import ExecutionPlan, Priority
from services.status import SloOutOfReach, SloUnattainable


def test_an_idle_decode_worker_prefills_a_prompt_itself_no_push_is_cheaper() -> None:
    cluster = Cluster(prefill=1, decode=1)

    placement = cluster.place(2000)

    assert placement.plan is ExecutionPlan.LOCAL_PREFILL and placement.decode.worker_id == "decode-0"
    assert placement.predicted_ttft_ms == pytest.approx(210.0)  # one step: 10 + 0.1 x 2000
    assert placement.cost_ms == pytest.approx(210.0)


def test_a_local_prefill_that_would_push_running_requests_past_their_tpot_goes_to_a_prefill_worker() -> None:
    # Four requests decode at 10.4 ms a step. A 2000-token prompt riding their steps stalls them
    # 200 ms; with 100 tokens left at a 12 ms target they can absorb 100 x (12 - 10.5) = 150 ms.
    cluster = Cluster(prefill=1, decode=1)
    cluster.running("decode-0", 4, tpot_ms=12.0)

    placement = cluster.place(2000)

    assert placement.plan is ExecutionPlan.DISAGGREGATED
    assert placement.prefill is not None and placement.prefill.worker_id == "prefill-0"
    assert placement.predicted_ttft_ms == pytest.approx(215.0)  # 210 of prefill + the 5 ms push
    assert placement.predicted_tpot_ms == pytest.approx(10.5)  # the batch of five


def test_the_same_batch_with_a_looser_target_takes_the_local_prefill() -> None:
    cluster = Cluster(prefill=1, decode=1)
    cluster.running("decode-0", 4, tpot_ms=20.0)  # 100 x (20 - 10.5) = 950 ms of room for 200

    placement = cluster.place(2000)

    assert placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert placement.cost_ms == pytest.approx(200.0)  # what the steps gain: the prompt's compute
    assert placement.predicted_ttft_ms == pytest.approx(210.4)  # one step with the four rows


def test_the_prefill_worker_holding_the_prompts_prefix_wins_it_costs_less() -> None:
    cluster = Cluster(prefill=2, decode=1)
    cluster.running("decode-0", 4, tpot_ms=12.0)  # no room for a local prefill
    prompt = list(range(2000))
    cluster.caches("prefill-1", prompt, 1024)

    placement = cluster.place(prompt)

    assert placement.prefill is not None and placement.prefill.worker_id == "prefill-1"
    assert placement.cached_tokens == 1024
    assert placement.cost_ms == pytest.approx(10 + 0.1 * 976 + 5)


def test_plans_within_the_tie_fraction_go_to_the_worker_holding_more_of_the_prefix() -> None:
    # prefill-1 holds the prompt's first block (16 tokens) but has 8 ms of work queued: its plan
    # costs 10 + 198.4 + 5 (the push) = 213.4 ms and its first token comes at 8 + 213.4 = 221.4 ms,
    # 6.4 ms after prefill-0's (210 + 5); at half a compute-ms per ms of wait that is 216.6 against
    # prefill-0's 215: dearer, but within 2%, a tie, which prefix affinity breaks.
    prompt = list(range(2000))

    def place(queued_ms: float):
        cluster = Cluster(prefill=2, decode=1)
        cluster.running("decode-0", 4, tpot_ms=12.0)  # no room for a local prefill
        cluster.caches("prefill-1", prompt, 16)
        cluster.queued("prefill-1", queued_ms)
        return cluster.place(prompt)

    tie = place(8.0)
    assert tie.prefill is not None and tie.prefill.worker_id == "prefill-1" and tie.cached_tokens == 16
    assert tie.predicted_ttft_ms == pytest.approx(221.4)
    # 30 ms queued: 213.4 + 0.5 x 28.4 = 227.6 against 215, past the tie: the cheaper plan wins.
    cheaper = place(30.0)
    assert cheaper.prefill is not None and cheaper.prefill.worker_id == "prefill-0" and cheaper.cached_tokens == 0
    assert cheaper.predicted_ttft_ms == pytest.approx(215.0)


def test_a_decode_worker_whose_requests_would_miss_their_tpot_is_passed_over() -> None:
    # decode-0 runs ten requests at 11.0 ms a step, each with an 11 ms target: one more makes 11.1.
    cluster = Cluster(prefill=1, decode=2)
    cluster.running("decode-0", 10, tpot_ms=11.0)

    placement = cluster.place(100)

    assert placement.decode.worker_id == "decode-1"


def test_no_plan_meeting_the_tpot_of_running_requests_is_refused_with_when_one_leaves() -> None:
    cluster = Cluster(prefill=1, decode=1)
    cluster.running("decode-0", 10, tpot_ms=11.0)  # 100 tokens left each at 11 ms: the first leaves in 1.1 s

    with pytest.raises(SloUnattainable) as refused:
        cluster.place(100)

    assert refused.value.retry_after_s == pytest.approx(1.1)
    assert cluster.ledger.bookings.keys() == {f"decode-0/r{i}" for i in range(10)}  # nothing booked for it


def test_a_local_prefill_whose_stall_no_running_request_can_absorb_is_refused_until_one_leaves() -> None:
    # No prefill worker; the four running requests can absorb 150 ms of stall, the prompt needs 200.
    # In time and with room, the plan waits for a member to leave: 100 tokens x 10.4 ms.
    cluster = Cluster(prefill=0, decode=1)
    cluster.running("decode-0", 4, tpot_ms=12.0)

    with pytest.raises(SloUnattainable) as refused:
        cluster.place(2000)

    assert refused.value.retry_after_s == pytest.approx(1.04)


def test_a_request_needing_nearly_all_of_an_idle_decode_workers_cache_is_placed() -> None:
    # 100 + 1,850 tokens of KV: past the 10% kept free for a batch to grow, within the cache.
    cluster = Cluster(prefill=0, decode=1, kv_tokens=2048)

    placement = cluster.place(100, max_tokens=1850)

    assert placement.plan is ExecutionPlan.LOCAL_PREFILL and placement.decode.worker_id == "decode-0"
    with pytest.raises(SloOutOfReach) as refused:  # more than the whole cache: never
        Cluster(prefill=0, decode=1, kv_tokens=2048).place(100, max_tokens=2000)
    assert refused.value.retry_after_s is None


def test_a_full_queue_is_refused_with_when_it_will_have_drained_enough() -> None:
    # Both workers have 3 s of prompt work queued; the new prompt takes 110 ms (+5 to push): with a
    # 1 s TTFT target it must wait until 2.115 s of the queue is gone.
    cluster = Cluster(prefill=1, decode=1)
    cluster.queued("prefill-0", 3000.0)
    cluster.queued("decode-0", 3000.0)

    with pytest.raises(SloUnattainable) as refused:
        cluster.place(1000, ttft_ms=1000)

    assert refused.value.retry_after_s == pytest.approx(2.11, abs=0.01)
    cluster.now += 2.2  # the queues drained as predicted: the same request fits
    assert cluster.place(1000, ttft_ms=1000).predicted_ttft_ms <= 1000


def test_a_prompt_no_idle_worker_could_prefill_in_time_is_out_of_reach_naming_the_target_and_the_best() -> None:
    cluster = Cluster(prefill=1, decode=1)

    with pytest.raises(SloOutOfReach) as refused:
        cluster.place(20_000, ttft_ms=1000)  # 10 steps: 100 + 2000 ms on an idle worker

    assert refused.value.retry_after_s is None
    assert refused.value.field == "slo.ttft_ms"
    assert str(refused.value) == (
        "slo.ttft_ms: is 1000 ms, and the fastest plan is predicted to need 2100 ms for the prompt alone "
        "(20000 tokens) even on an idle worker; allow at least 2100 ms or shorten the prompt; retrying will not help"
    )


def test_a_tpot_target_below_a_lone_decode_step_is_out_of_reach() -> None:
    cluster = Cluster(prefill=1, decode=2)

    with pytest.raises(SloOutOfReach) as refused:
        cluster.place(100, tpot_ms=10.0)  # a step alone: 10 + 0.1 ms

    assert refused.value.field == "slo.tpot_ms"
    assert "predicted to take 10.1 ms per token even running this request alone" in str(refused.value)


def test_lower_priority_work_does_not_delay_a_higher_priority_first_token() -> None:
    cluster = Cluster(prefill=1, decode=1)
    cluster.queued("prefill-0", 5000.0, Priority.LOW)
    cluster.queued("decode-0", 5000.0, Priority.LOW)

    for priority in (Priority.HIGH, Priority.NORMAL):
        placement = cluster.place(1000, ttft_ms=1000, priority=priority)
        assert placement.predicted_ttft_ms is not None and placement.predicted_ttft_ms < 1000
    with pytest.raises(SloUnattainable):  # the low one waits behind the low backlog
        cluster.place(1000, ttft_ms=1000, priority=Priority.LOW)


def test_a_decode_worker_without_room_for_the_requests_kv_is_passed_over() -> None:
    cluster = Cluster(prefill=1, decode=2, kv_tokens=10_000)
    cluster.running("decode-0", 8, tpot_ms=0.0)  # 8 x 1100 tokens of 9000 usable (10% kept free)

    assert cluster.place(1000).decode.worker_id == "decode-1"


def test_a_refusal_names_whole_milliseconds_without_the_fit_s_float_noise() -> None:
    from services.scheduler.plan import _whole_ms

    assert _whole_ms(2100.0000000000005) == 2100  # a least-squares forecast of an exact 2,100 ms
    assert _whole_ms(2100.2) == 2101 and _whole_ms(7.0) == 7
