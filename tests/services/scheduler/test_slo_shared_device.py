"""Workers sharing one GPU time-slice it: a prompt prefilled by the prefill worker is not extra
capacity beside the decode worker, it competes with that worker's own steps. The `slo` policy
forecasts the device as the GPU runs it: each busy worker a context with an equal share, a prompt
waiting for its own worker's queue only and running beside the others' work, what it takes from
their queued prompts counted in its cost, and the decode batches' TPOT targets absorbing the stall
of a prompt on either worker.

One H100, 2026-11-26: 1 prefill + 1 decode worker on the same GPU, 16 concurrent 4k prompts:
disaggregated TTFT p50 1,137 ms against 362 ms for the colocated mesh; the policy spread the burst
over the two workers as if they were two devices.

The cluster (slo_cluster.py): a step costs 10 ms, plus 0.1 ms per prompt token and 0.1 ms per
decode row; a KV push 5 ms; prompts of up to 2048 tokens take one step.
"""

from __future__ import annotations

import dataclasses

import pytest
from slo_cluster import LAYOUT, Cluster

from pdmesh.enums import ExecutionPlan, WorkerRole
from services.scheduler import slo
from services.scheduler.convert_workers import worker_info_from_pb, worker_info_to_pb
from services.scheduler.reports import Capacity, WorkerInfo
from services.status import SloUnattainable

GPU = "host-a/GPU-5b1e7c2a"


def test_a_burst_on_one_shared_gpu_stays_on_one_worker_as_on_the_colocated_mesh() -> None:
    shared = Cluster(prefill=1, decode=1, device_id=GPU)

    plans = [shared.place(2000) for _ in range(4)]

    # The first is cheaper locally (210 ms against 210 + the 5 ms push). The second would wait 210 ms
    # either way — the device is busy with the first whichever worker computes it — so the cheaper
    # plan wins again: first token at 210 + 210.1 (the first one's row rides its steps).
    assert [p.plan for p in plans] == [ExecutionPlan.LOCAL_PREFILL] * 4
    assert plans[0].predicted_ttft_ms == pytest.approx(210.0)
    assert plans[1].predicted_ttft_ms == pytest.approx(420.1)


def test_on_two_gpus_the_same_burst_still_uses_the_prefill_worker() -> None:
    separate = Cluster(prefill=1, decode=1)

    plans = [separate.place(2000) for _ in range(2)]

    # The prefill worker's own GPU is idle: the second's first token at 215 ms instead of 420.1.
    assert [p.plan for p in plans] == [ExecutionPlan.LOCAL_PREFILL, ExecutionPlan.DISAGGREGATED]
    assert plans[1].predicted_ttft_ms == pytest.approx(215.0)


def test_the_prefill_worker_on_a_decoding_gpu_runs_at_half_pace() -> None:
    # Four requests decode on decode-0 (10.4 ms a step, 20 ms targets): the prefill worker's prompt
    # shares the GPU with their steps, 210 ms of work in 420 ms; the local prefill takes 210.4.
    shared = Cluster(prefill=1, decode=1, device_id=GPU)
    shared.running("decode-0", 4, tpot_ms=20.0)

    placement = shared.place(2000)

    assert placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert placement.predicted_ttft_ms == pytest.approx(210.4)


def test_a_prefill_worker_on_the_same_gpu_does_not_escape_the_running_requests_tpot() -> None:
    # As test_slo_policy's: four requests decode at 10.4 ms a step with a 12 ms target; a 2000-token
    # prompt stalls them 200 ms, more than the 150 ms they can absorb. On its own GPU the prefill
    # worker takes the prompt; on theirs its prompt stalls them as much: refused, and it says why.
    separate = Cluster(prefill=1, decode=1)
    separate.running("decode-0", 4, tpot_ms=12.0)
    assert separate.place(2000).plan is ExecutionPlan.DISAGGREGATED

    shared = Cluster(prefill=1, decode=1, device_id=GPU)
    shared.running("decode-0", 4, tpot_ms=12.0)
    with pytest.raises(SloUnattainable) as refused:
        shared.place(2000)
    assert "stall would push running requests past their TPOT targets" in str(refused.value)


def test_a_prompt_beside_the_prefill_workers_queue_shares_the_device_instead_of_waiting_for_it() -> None:
    shared = Cluster(prefill=1, decode=1, device_id=GPU)
    shared.queued("prefill-0", 500.0)  # 500 ms of prompts queued on the prefill worker

    placement = shared.place(100)

    # Locally: its one step of 100 tokens, 10 + 10 + 0.1 ms (the queued booking's row rides along),
    # at half the device while the prefill worker works through its queue beside it: 40.2 ms, not
    # the 520.1 of waiting for that queue (the rule before: the GPU as one queue).
    assert placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert placement.predicted_ttft_ms == pytest.approx(40.2)


@pytest.mark.parametrize("decoding", [0, 4])
def test_a_prompt_goes_local_while_the_prefill_worker_holds_a_queue(decoding: int) -> None:
    # H100, c16x4kl (BENCHMARKS.md): with the GPU forecast as one queue the prefill worker's 15 queued
    # prompts were ahead of a new prompt on either worker, the waits tied, the prefill worker's cheaper
    # compute won, and every prompt of the run queued there (TTFT 11x the colocated mesh's).
    shared = Cluster(prefill=1, decode=1, device_id=GPU)
    shared.running("decode-0", decoding, tpot_ms=0.0)
    for _ in range(15):
        shared.queued("prefill-0", 210.0)  # 15 prompts of 2000 tokens, bound for decode-0

    placement = shared.place(2000)

    # Locally one step of 10 + 200 + 0.1 per row (15 bound for it, `decoding` running), at half
    # the device beside the prefill worker's queue. There: after its 3,150 ms of queue, itself at
    # half pace beside decode-0's batch (members bound for it decode by then): 6,300 + 420 + 5 ms.
    rows = 15 + decoding
    assert placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert placement.predicted_ttft_ms == pytest.approx(2 * (210.0 + 0.1 * rows))


def test_a_cheaper_plan_on_the_prefill_worker_does_not_pull_a_prompt_behind_its_queue() -> None:
    # The trap itself: the prefill worker's plan is the cheaper (it holds 256 of the prompt's 2000
    # tokens: 10 + 174.4 + 5 ms against the local prefill's 200). As one queue for the device the
    # waits tied (its 15 queued prompts ahead either way) and it won: first token after 3,150 ms.
    # Beside that queue the local prompt runs at once, at half pace: 2 x 211.5 = 423 ms, against
    # 2 x (3,150 + 184.4) + 5 there (decode-0's batch, bound for it, steps beside its queue).
    shared = Cluster(prefill=1, decode=1, device_id=GPU)
    for _ in range(15):
        shared.queued("prefill-0", 210.0)
    prompt = list(range(2000))
    shared.caches("prefill-0", prompt, 256)

    placement = shared.place(prompt)

    assert placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert placement.predicted_ttft_ms == pytest.approx(423.0)


def test_an_idle_prefill_worker_holding_the_prefix_still_takes_the_prompt() -> None:
    # Nothing queued, nothing decoding: the prefill worker holding 1024 of 2000 tokens computes the
    # rest in 10 + 97.6 ms and pushes in 5, against 210 ms locally; sharing the GPU changes nothing.
    shared = Cluster(prefill=1, decode=1, device_id=GPU)
    prompt = list(range(2000))
    shared.caches("prefill-0", prompt, 1024)

    placement = shared.place(prompt)

    assert placement.plan is ExecutionPlan.DISAGGREGATED
    assert placement.predicted_ttft_ms == pytest.approx(112.6)


def test_a_prompt_on_an_idle_prefill_worker_counts_what_it_takes_from_the_local_queue() -> None:
    # decode-0 has three local prompts of 210 ms queued (none decoding yet). The prefill worker's plan
    # gives the first token soonest (425 ms: 210 of work at half the device beside decode-0's
    # context), but each of the three queued prompts ends 210 ms later for it: 630 ms of waits.
    # Locally: 630 + 210.3 = 840.3 ms, cost 200 + 0.5 x (840.3 - 425) = 407.7 against 215 + 0.5 x 630
    # = 530. On two GPUs the same hand-off takes nothing from anyone: handed off.
    shared, separate = Cluster(prefill=1, decode=1, device_id=GPU), Cluster(prefill=1, decode=1)
    for cluster in (shared, separate):
        for _ in range(3):
            cluster.queued("decode-0", 210.0)

    placement = shared.place(2000)
    assert placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert placement.predicted_ttft_ms == pytest.approx(840.3)
    assert separate.place(2000).plan is ExecutionPlan.DISAGGREGATED


def test_a_cheaper_prefill_worker_on_the_same_gpu_leaves_the_prompt_to_the_decode_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On the H100 the prefill worker's fitted model forecast its prompts cheaper than a local
    # prefill (its steps prefill only), and 16 concurrent 4k prompts went to it 31-34 times in 80:
    # TTFT p50 1.55x the colocated mesh's, 1.00x with every prompt local. Here its forecast compute
    # is halved (105 + 5 ms against 210 locally): on its own GPU it takes the prompt; on the decode
    # worker's GPU, which computes the prompt either way, the prompt stays local.
    forecast = slo.prefill_on

    def cheaper_on_prefill_workers(*args: object, **kwargs: object) -> object:
        p = forecast(*args, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(p, compute_ms=p.compute_ms / 2) if p.worker.info.role is WorkerRole.PREFILL else p

    monkeypatch.setattr(slo, "prefill_on", cheaper_on_prefill_workers)
    shared, separate = Cluster(prefill=1, decode=1, device_id=GPU), Cluster(prefill=1, decode=1)

    assert separate.place(2000).plan is ExecutionPlan.DISAGGREGATED
    assert shared.place(2000).plan is ExecutionPlan.LOCAL_PREFILL


def test_the_registry_groups_workers_by_the_device_they_name() -> None:
    cluster = Cluster(prefill=2, decode=1, device_id=GPU)
    registry = cluster.registry
    capacity = Capacity(64, 8, 2048, 4096)
    other_gpu = WorkerInfo("decode-9", None, "test://d9", "", "m", LAYOUT, capacity, "dev", device_id="host-b/GPU-1")
    registry.add(other_gpu, None)
    registry.add(WorkerInfo("cpu-0", None, "test://c0", "", "m", LAYOUT, capacity, "cpu"), None)

    names = lambda worker_id: [w.worker_id for w in registry.sharing(registry.workers[worker_id])]  # noqa: E731
    assert names("decode-0") == ["prefill-0", "prefill-1"]
    assert names("decode-9") == [] and names("cpu-0") == []  # alone on its GPU; a CPU worker names none
    registry.mark_dead(registry.workers["prefill-1"])
    assert names("decode-0") == ["prefill-0"]


def test_the_device_id_travels_in_the_registration() -> None:
    info = WorkerInfo("decode-0", None, "h:1", "h:2", "m", LAYOUT, Capacity(64, 8, 2048, 4096), "cuda", "1", GPU)
    assert worker_info_from_pb(worker_info_to_pb(info)).device_id == GPU
