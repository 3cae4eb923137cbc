"""`pdmesh bench profile`: record a live mesh's performance profile for the simulator (pdmesh sim)
and as the scheduler's prior (PDMESH_SLO_PROFILE).

The profile is what the scheduler itself learned: its workers report every engine step and KV
push they measure, and the scheduler fits each worker's step-time and transfer models to them
(services/scheduler/predictor.py). This command drives a calibration load that exercises every
term of those models — prompts from a few tokens to `max_prompt` (prefill tokens and attention
pairs), then decode batches of growing size over growing contexts (decode rows and context) — and
then reads the fitted models from GetClusterState. Without the load (`drive=False`) it reads the
models as they stand: after a trace replay, the profile of the mesh under that load (on a shared
CPU, workers contending for cores run slower than the calibration load shows). Coefficients are
the median over the workers
that saw samples; the step noise is their median RMS relative error; capacities and the KV
weight of a token come from what the workers registered.

What the step models leave out is measured from the calibration load's own requests, for the
simulator: the time a busy engine spends between the steps it times (the median of each lone
request's TPOT less its predicted decode step: its engine loop, streaming each token out) and
each request's calls before its prompt reaches a worker (the median of each prompt's TTFT less
its predicted prefill and push), and a hand-off's (a handed-off prompt's second token less its
decode step and the gap: the Decode.Generate call). A CPU mesh on one host also shares its cores
(`--shared-cores`): the simulator then slows steps that run at once, as the host does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from pdmesh.bench.backend import Backend, GenerationOptions
from pdmesh.bench.grpc_backend import GrpcBackend
from pdmesh.bench.metrics import RequestResult
from pdmesh.bench.runner import run_point
from pdmesh.bench.workload import BenchRequest, Vocabulary
from pdmesh.client import AsyncClient, ClusterState, WorkerRole, WorkerState
from pdmesh.config import SchedulerConfig
from services.scheduler.predictor import StepModel, TransferModel
from services.scheduler.profile import Profile, RoleProfile


@dataclass(frozen=True)
class ProfileLoad:
    max_prompt: int = 1024  # the longest prompt of the calibration load
    concurrencies: tuple[int, ...] = (1, 4, 8, 16)  # decode batches exercised
    decode_tokens: int = 32  # output of each decode-phase request
    seed: int = 0
    drive: bool = True  # False: read the models fitted so far, driving no load
    shared_cores: float = 0.0  # the cores the mesh's workers share (a CPU mesh on one host); 0: a device each


# Prompts longer than this are handed off by the mesh's default policy settings (least_loaded's
# local_prefill_max_tokens): their second token measures the hand-off.
LOCAL_PREFILL_MAX_TOKENS = SchedulerConfig.local_prefill_max_tokens


@dataclass(frozen=True)
class Calibrated:
    """The calibration load's requests: prompts (two at a time) and lone decodes (one at a time)."""

    prompts: list[RequestResult]
    lone_decodes: list[RequestResult]


async def record_profile(target: str, name: str, load: ProfileLoad, vocab: Vocabulary, console: Console) -> Profile:
    """Drive the calibration load (unless told not to), then read and pool the scheduler's fitted models."""
    async with GrpcBackend(target) as backend, AsyncClient(target) as client:
        server = await backend.describe()
        calibrated = await _calibrate(backend, load, vocab, console) if load.drive else None
        state = await client.cluster_state()
    source = f"recorded from {target} ({server.model}, {server.detail}) by pdmesh bench profile"
    profile = dataclasses.replace(pooled(state, name, source, server.model), shared_cores=load.shared_cores)
    return profile if calibrated is None else with_overheads(profile, calibrated)


def with_overheads(profile: Profile, calibrated: Calibrated) -> Profile:
    """The profile with the step gap and the per-request overhead its calibration requests show
    beyond what its models predict (medians; never negative)."""
    step, budget = profile.step, profile.prefill.max_batched_tokens
    gaps = [
        r.tpot_s * 1000 - step.decode_step_ms(1, r.prompt_tokens + r.output_tokens // 2)
        for r in calibrated.lone_decodes if r.ok and r.tpot_s is not None
    ]  # fmt: skip
    overheads = [
        r.ttft_s * 1000 - step.prefill_ms(r.prompt_tokens, 0, budget)
        - profile.transfer.transfer_ms(r.prompt_tokens * profile.kv_bytes_per_token)
        for r in calibrated.prompts if r.ok and r.ttft_s is not None
    ]  # fmt: skip
    gap = max(0.0, _median(gaps))
    # A handed-off prompt's second token comes from its decode worker: the hand-off, then a step.
    handoffs = [
        r.tpot_s * 1000 - step.decode_step_ms(1, r.prompt_tokens + 1) - gap
        for r in calibrated.prompts if r.ok and r.tpot_s is not None and r.prompt_tokens > LOCAL_PREFILL_MAX_TOKENS
    ]  # fmt: skip
    return dataclasses.replace(
        profile, step_gap_ms=gap, request_overhead_ms=max(0.0, _median(overheads)),
        handoff_ms=max(0.0, _median(handoffs)),
    )  # fmt: skip


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


async def _calibrate(backend: Backend, load: ProfileLoad, vocab: Vocabulary, console: Console) -> Calibrated:
    """Prompts of growing length, then decode batches of growing size."""
    rng = np.random.default_rng(load.seed)
    options = GenerationOptions(ignore_eos=True)
    lengths = np.unique(np.geomspace(8, load.max_prompt, 12).astype(int))
    prompts = [BenchRequest(i, vocab.random_ids(rng, int(n)), int(n), 2) for i, n in enumerate(lengths)]
    console.print(f"profile: {len(prompts)} prompts of {lengths[0]} to {lengths[-1]} tokens, two at a time")
    prompt_results = await run_point(backend, prompts * 2, options, max_in_flight=2)
    lone: list[RequestResult] = []
    for c in load.concurrencies:
        batch = [
            BenchRequest(i, vocab.random_ids(rng, n := int(rng.integers(16, load.max_prompt // 2))), n,
                         load.decode_tokens)  # fmt: skip
            for i in range(2 * c)
        ]
        console.print(f"profile: decode batches of {c} ({len(batch)} requests of {load.decode_tokens} tokens)")
        results = await run_point(backend, batch, options, max_in_flight=c)
        if c == 1:
            lone = results
    await asyncio.sleep(1.5)  # the last steps reach the scheduler with the next reports
    return Calibrated(prompt_results, lone)


def pooled(state: ClusterState, name: str, source: str, model: str) -> Profile:
    """One profile from every worker's fitted models (medians over those that saw samples)."""
    fitted = [w for w in state.workers if w.step_model.num_samples > 0]
    if not fitted:
        raise ValueError("the scheduler has no step samples from any worker: is the mesh serving requests?")
    pushes = [w for w in state.workers if w.transfer_model.num_samples > 0]

    def med(values: list[float]) -> float:
        return float(statistics.median(values)) if values else 0.0

    s = [w.step_model for w in fitted]
    step = StepModel(
        fixed_ms=med([m.fixed_ms for m in s]), ms_per_prefill_token=med([m.per_prefill_token_ms for m in s]),
        ns_per_attention_pair=med([m.per_attention_pair_ms for m in s]) * 1e6,
        ms_per_decode_request=med([m.per_decode_request_ms for m in s]),
        us_per_decode_context_token=med([m.per_decode_context_token_ms for m in s]) * 1e3,
    )  # fmt: skip
    transfer = TransferModel(
        med([w.transfer_model.fixed_ms for w in pushes]), med([w.transfer_model.per_mib_ms for w in pushes])
    )
    return Profile(
        name=name, source=f"{source}, {time.strftime('%Y-%m-%d %H:%M')}", model=model, step=step,
        prefill=_role(state.workers, WorkerRole.PREFILL), decode=_role(state.workers, WorkerRole.DECODE),
        transfer=transfer, kv_bytes_per_token=max(w.kv_bytes_per_token for w in state.workers),
        step_noise=med([m.rms_relative_error for m in s]),
    )  # fmt: skip


def _role(workers: tuple[WorkerState, ...], role: WorkerRole) -> RoleProfile:
    mine = [w for w in workers if w.role is role] or list(workers)
    return RoleProfile(
        kv_capacity_tokens=min(w.kv_capacity_tokens for w in mine),
        max_batched_tokens=min(w.max_num_batched_tokens for w in mine) or 2048,
        max_running=min(w.max_num_running_requests for w in mine) or 64,
    )
