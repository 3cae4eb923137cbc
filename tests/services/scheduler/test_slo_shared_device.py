"""Workers sharing one GPU time-slice it: a prompt prefilled by the prefill worker is not extra
capacity beside the decode worker, it competes with that worker's own steps. The `slo` policy
forecasts them as one device: prompt work queued on any worker of the device is ahead of a new
prompt, a prompt runs at the device's pace while decode batches step beside it, and those batches'
TPOT targets must absorb the stall of a prompt on either worker.

One H100, 2026-11-26: 1 prefill + 1 decode worker on the same GPU, 16 concurrent 4k prompts:
disaggregated TTFT p50 1,137 ms against 362 ms for the colocated mesh; the policy spread the burst
over the two workers as if they were two devices.

The cluster (slo_cluster.py): a step costs 10 ms, plus 0.1 ms per prompt token and 0.1 ms per
decode row; a KV push 5 ms; prompts of up to 2048 tokens take one step.
"""

from __future__ import annotations

import pytest
from slo_cluster import LAYOUT, Cluster

from pdmesh.enums import ExecutionPlan
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


def test_queued_prompt_work_of_either_worker_is_ahead_on_the_device() -> None:
    shared = Cluster(prefill=1, decode=1, device_id=GPU)
    shared.queued("prefill-0", 500.0)  # 500 ms of prompts queued on the prefill worker

    placement = shared.place(100)

    # Locally: after the prefill worker's 500 ms, then 10 + 10 ms (its one step of 100 tokens).
    assert placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert placement.predicted_ttft_ms == pytest.approx(520.0 + 0.1)  # the queued booking's row rides along


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
