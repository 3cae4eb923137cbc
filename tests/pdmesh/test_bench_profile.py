"""`pdmesh bench profile` turns the scheduler's fitted models into one profile the simulator loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pdmesh.bench.profile import pooled
from pdmesh.client import ClusterState, StepFit, TransferFit, WorkerHealth, WorkerRole, WorkerState
from services.scheduler.profile import load_profile, save_profile

BASE = WorkerState(
    worker_id="", role=None, address="", model="m", health=WorkerHealth.SERVING, num_kv_blocks_free=0,
    num_kv_blocks_total=0, num_running_requests=0, num_waiting_requests=0, num_kv_reservations=0,
    num_kv_transfers_in_flight=0, num_assigned_requests=0, last_report_unix_ms=0, kv_bytes_per_token=46080,
    max_num_batched_tokens=2048, max_num_running_requests=64,
)  # fmt: skip


def worker(name: str, role: WorkerRole, fixed_ms: float, samples: int, kv: int, push: TransferFit) -> WorkerState:
    fit = StepFit(fixed_ms, 1.0, 2e-6, 3.0, 4e-5, samples, 0.1)
    return dataclasses.replace(BASE, worker_id=name, role=role, step_model=fit, transfer_model=push,
                               kv_capacity_tokens=kv)  # fmt: skip


def test_the_profile_is_the_median_of_the_workers_that_saw_samples(tmp_path: Path) -> None:
    state = ClusterState(0, "slo", 0, 0, (
        worker("prefill-0", WorkerRole.PREFILL, 10.0, 100, 8000, TransferFit(2.0, 0.5, 40)),
        worker("prefill-1", WorkerRole.PREFILL, 30.0, 100, 6000, TransferFit(4.0, 0.5, 40)),
        worker("decode-0", WorkerRole.DECODE, 20.0, 300, 5000, TransferFit()),
        worker("decode-1", WorkerRole.DECODE, 900.0, 0, 7000, TransferFit()),  # never measured: left out
    ))  # fmt: skip

    profile = pooled(state, "cpu-mesh", "a test", "smollm2")

    assert profile.step.fixed_ms == 20.0  # median of 10, 30, 20
    assert profile.step.ns_per_attention_pair == pytest.approx(2.0)  # the proto's per-pair ms, in ns
    assert profile.step.us_per_decode_context_token == pytest.approx(0.04)
    assert (profile.transfer.fixed_ms, profile.transfer.ms_per_mib) == (3.0, 0.5)  # the prefill workers' pushes
    assert profile.prefill.kv_capacity_tokens == 6000 and profile.decode.kv_capacity_tokens == 5000
    assert profile.kv_bytes_per_token == 46080 and profile.step_noise == pytest.approx(0.1)
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(str(tmp_path / "p.json")) == profile


def test_a_mesh_that_served_nothing_has_no_profile() -> None:
    state = ClusterState(0, "slo", 0, 0, (worker("decode-0", WorkerRole.DECODE, 5.0, 0, 100, TransferFit()),))

    with pytest.raises(ValueError, match="no step samples"):
        pooled(state, "x", "y", "z")


def test_an_unknown_profile_is_named_with_the_builtins() -> None:
    with pytest.raises(ValueError, match="h100-llama-3.1-8b"):
        load_profile("no-such-profile")
