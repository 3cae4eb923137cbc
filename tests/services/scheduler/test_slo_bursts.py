"""The `slo` policy under a burst of long prompts arriving together: each is placed with the queue
the ones before it left, and a plan's cost counts the wait its queue adds to the request's first
token (SloSettings.wait_weight, 0.5), so a burst spreads over the workers that can start a prompt
sooner — while running requests' TPOT targets still bound what local prefills may stall.

The cluster (slo_cluster.py): a step costs 10 ms + 0.1 ms per prompt token + 0.1 ms per decode
row, a push 5 ms; prompts of up to 2048 tokens take one step. The decode worker runs four requests
when the burst comes. A 2000-token prompt costs 200 ms locally (what the decode steps gain) and
210 + 5 ms on the prefill worker; its local prefill queues behind the earlier local ones (each
~210.5 ms: the step with the batch's rows), its hand-off behind the earlier hand-offs (210 ms each).
"""

from __future__ import annotations

import pytest
from slo_cluster import Cluster

from pdmesh.enums import ExecutionPlan

LOCAL, HANDOFF = ExecutionPlan.LOCAL_PREFILL, ExecutionPlan.DISAGGREGATED


def burst(cluster: Cluster, prompts: list[list[int]] | int) -> list[tuple[ExecutionPlan, float]]:
    """Places the prompts at one instant, in order: each one's plan and predicted TTFT."""
    shapes = [[*range(2000)]] * prompts if isinstance(prompts, int) else prompts
    placed = [cluster.place(prompt) for prompt in shapes]
    return [(p.plan, round(p.predicted_ttft_ms or 0.0, 1)) for p in placed]


def test_a_burst_of_long_prompts_alternates_between_the_decode_and_the_prefill_worker() -> None:
    cluster = Cluster(prefill=1, decode=1)
    cluster.running("decode-0", 4, tpot_ms=0.0)

    # 1st: local, 200 against 215. 2nd: local would start after the first (TTFT 421 against the
    # hand-off's 215): 200 + 206 / 2 > 215. 3rd: both queues one prompt deep: local again, and so on.
    assert burst(cluster, 6) == [
        (LOCAL, 210.4), (HANDOFF, 215.0), (LOCAL, 421.0), (HANDOFF, 425.0), (LOCAL, 631.8), (HANDOFF, 635.0),
    ]  # fmt: skip


def test_without_the_wait_in_the_cost_the_whole_burst_queued_on_the_cheaper_worker() -> None:
    # The flaw this replaced (wait_weight 0: compute alone): the 6th prompt waits 1.05 s for the
    # five before it on the decode worker while the prefill worker idles.
    cluster = Cluster(prefill=1, decode=1, wait_weight=0.0)
    cluster.running("decode-0", 4, tpot_ms=0.0)

    placed = burst(cluster, 6)

    assert [plan for plan, _ in placed] == [LOCAL] * 6
    assert placed[-1][1] == pytest.approx(1263.9)


def test_a_worker_holding_the_prefix_keeps_the_burst_until_its_queue_costs_more_than_the_compute_it_saves() -> None:
    # prefill-0 holds the prompts' first 1024 tokens: a hand-off costs 10 + 0.1 x 976 + 5 = 112.6 ms
    # against 200 locally. It takes the burst while its queue's wait, at half weight, adds less than
    # the 87.4 ms it saves: the 3rd prompt's 117 ms more than locally does not (58.6), the 4th's 225
    # does (TTFT 435.4 against 210.7 locally); then the decode worker's queue evens it out again.
    cluster = Cluster(prefill=1, decode=1)
    cluster.running("decode-0", 4, tpot_ms=0.0)
    prefix = [*range(1024)]
    cluster.caches("prefill-0", [*prefix, 5000], 1024)
    prompts = [[*prefix, *range(10_000 + 1000 * i, 10_976 + 1000 * i)] for i in range(6)]

    assert burst(cluster, prompts) == [
        (HANDOFF, 112.6), (HANDOFF, 220.2), (HANDOFF, 327.8), (LOCAL, 210.7), (HANDOFF, 435.4), (HANDOFF, 543.0),
    ]  # fmt: skip
    with_compute_alone = Cluster(prefill=1, decode=1, wait_weight=0.0)
    with_compute_alone.running("decode-0", 4, tpot_ms=0.0)
    with_compute_alone.caches("prefill-0", [*prefix, 5000], 1024)
    assert [plan for plan, _ in burst(with_compute_alone, prompts)] == [HANDOFF] * 6  # the H200's c16x4k


def test_running_requests_tpot_targets_bound_the_stall_of_a_burst_of_local_prefills() -> None:
    # The four running requests have 100 tokens left at a 15 ms target: about 100 x (15 - 10.7)
    # = 430 ms of stall to give. Each local prefill stalls them 200 ms, and the ones queued before
    # it stall them too: two fit (410 ms), a third (621 ms) does not — the rest are handed off,
    # however long the prefill worker's queue.
    cluster = Cluster(prefill=1, decode=1)
    cluster.running("decode-0", 4, tpot_ms=15.0)

    assert burst(cluster, 6) == [
        (LOCAL, 210.4), (HANDOFF, 215.0), (LOCAL, 421.0), (HANDOFF, 425.0), (HANDOFF, 635.0), (HANDOFF, 845.0),
    ]  # fmt: skip


def test_an_idle_mesh_spreads_a_burst_over_every_worker_before_queueing_on_any() -> None:
    cluster = Cluster(prefill=2, decode=2)

    placed = burst(cluster, 4)

    # Two local prefills (one per decode worker, 210 ms) and two hand-offs (215 ms): no prompt waits.
    assert sorted(placed, key=lambda p: p[1]) == [(LOCAL, 210.0), (LOCAL, 210.0), (HANDOFF, 215.0), (HANDOFF, 215.0)]
    prefilling = {(b.prefill_worker, b.decode_worker) for b in cluster.ledger.bookings.values()}
    assert {w for w, _ in prefilling} == {"prefill-0", "prefill-1", "decode-0", "decode-1"}
