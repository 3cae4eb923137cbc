"""One simulated mesh: the scheduler's own placement over simulated workers, in virtual time.

The scheduler side is the real one: a Registry (virtual clock, no channels) whose predictors
calibrate from the workers' simulated load reports, a Ledger, the policy made by name and the
Placer the request flow uses. Each request takes the flow's steps (services/scheduler/flow.py),
at the moments the flow takes them:

    arrival -> Placer.place (a refusal ends it: RESOURCE_EXHAUSTED or OUT_OF_RANGE, counted as a miss)
      local prefill:   the decode worker computes the prompt; first token; decode rows
      disaggregated:   Decode.Reserve (full: the other decode workers, then waiting with backoff,
                       as capacity.reserve) -> the prefill worker's queue -> the exposed push ->
                       first token (Placer.prefilled) -> the decode batch -> finished (Placer.ended)

Requests arrive at their own times, or in a closed loop (`pdmesh bench serve --concurrency`): a
fixed number in flight, the next sent as one ends. Workers report load every `report_interval_s`
(phases spread), through Registry.report as the servicer does. The wall time of every Placer.place
call is kept: the decision latency.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.kv_layout import KVLayout
from pdmesh.bench.metrics import RequestResult
from pdmesh.config import PolicyName, SloConfig
from pdmesh.enums import WorkerRole
from pdmesh.sim.clock import EventLoop
from pdmesh.sim.cores import Cores, SharedCores
from pdmesh.sim.workers import Job, SimDecode, SimPrefill, SimWorker
from pdmesh.sim.workload import SimRequest, TracePrompt
from services.scheduler.ledger import Ledger
from services.scheduler.placer import Placer, make_policy
from services.scheduler.policy import Placement, RequestShape
from services.scheduler.predictor import Calibration, CalibrationSettings
from services.scheduler.profile import Profile
from services.scheduler.registry import Registry
from services.status import NoCapacity, NoLiveWorker, SloOutOfReach

_CODES = {SloOutOfReach: "OUT_OF_RANGE", NoLiveWorker: "UNAVAILABLE"}  # the rest are NoCapacity's
_BACKOFF_S = (0.01, 0.25)  # capacity.reserve's first and longest pause


@dataclass(frozen=True)
class MeshSpec:
    profile: Profile
    num_prefill: int
    num_decode: int
    block_tokens: int  # the trace's prefix block (512 scaled)
    slo: SloConfig  # the defaults every request gets, and the slo policy's settings
    use_prior: bool = True  # the scheduler starts from the profile (PDMESH_SLO_PROFILE) or from nothing
    report_interval_s: float = 0.5
    # >0: the workers share this many GPUs, placed as `pdmesh up` places them (decode workers from GPU
    # 0 up, prefill workers from the last down), each GPU time-slicing its workers (processor sharing)
    gpus: int = 0
    queue_timeout_s: float = 30.0
    local_prefill_max_tokens: int = 32
    seed: int = 0


class SimMesh:
    def __init__(self, spec: MeshSpec, policy: PolicyName, on_done: Callable[[RequestResult], None] | None = None):
        self.spec = spec
        self.loop = EventLoop()
        prior = (spec.profile.step, spec.profile.transfer) if spec.use_prior else (None, None)
        settings = CalibrationSettings(spec.slo.calibration_prior_weight, spec.slo.calibration_forget)
        calibration = Calibration(settings, *prior)
        self.registry = Registry(3.0, None, calibration, clock=self.loop.now)
        self.ledger = Ledger(self.loop.now)
        self.placer = Placer(
            make_policy(policy, self.registry, self.ledger, spec.slo, spec.local_prefill_max_tokens),
            self.registry, self.ledger, spec.slo,
        )  # fmt: skip
        self.results: dict[int, RequestResult] = {}
        self.decision_ns: list[int] = []  # wall time of each Placer.place
        self.decision_cpu_ns: list[int] = []  # its thread's CPU time: without preemption
        self.on_done = on_done
        self._unsent: deque[SimRequest] = deque()  # a closed loop's requests not sent yet
        self.workers: dict[str, SimWorker] = {}
        self._snapshot: dict[str, bool] = {}
        self._start_workers()

    # -- the mesh ---------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        spec, profile = self.spec, self.spec.profile
        # One layout for all: its fingerprint names the profile, its block the trace's, and its
        # shape weighs a token's KV as the profile does (float32, one layer, one head).
        layout = KVLayout(f"sim:{profile.name}", "float32", spec.block_tokens, 1, 1, profile.kv_bytes_per_token // 8)
        cores = SharedCores(self.loop, profile.shared_cores) if profile.shared_cores > 0 else Cores(self.loop)
        gpus = [SharedCores(self.loop, 1.0) for _ in range(spec.gpus)]
        for i in range(spec.num_prefill):
            gpu = spec.gpus - 1 - i % spec.gpus if gpus else -1
            self._add(SimPrefill(self.loop, f"prefill-{i}", profile, profile.prefill, spec.block_tokens,
                                 spec.seed * 100_003 + i, gpus[gpu] if gpus else cores,
                                 on_prefilled=self._prefilled), layout, gpu)  # fmt: skip
        for i in range(spec.num_decode):
            gpu = i % spec.gpus if gpus else -1
            self._add(SimDecode(self.loop, f"decode-{i}", profile, profile.decode, spec.block_tokens,
                                spec.seed * 100_003 + 50_000 + i, gpus[gpu] if gpus else cores,
                                on_first_token=self._first_token, on_finished=self._finished), layout, gpu)  # fmt: skip

    def _add(self, worker: SimWorker, layout: KVLayout, gpu: int = -1) -> None:
        if gpu >= 0:
            worker.device_id = f"sim/gpu-{gpu}"
        self.workers[worker.worker_id] = worker
        self.registry.add(worker.info(layout), None)
        self._snapshot[worker.worker_id] = True
        phase = (len(self.workers) * 0.618034) % 1.0  # spread the reports over the interval
        self.loop.at(phase * self.spec.report_interval_s, lambda: self._report(worker))
        self.registry.report(worker.report(snapshot=True))

    def _report(self, worker: SimWorker) -> None:
        load = worker.report(self._snapshot[worker.worker_id])
        _, self._snapshot[worker.worker_id] = self.registry.report(load)
        self.loop.after(self.spec.report_interval_s, lambda: self._report(worker))

    # -- requests ---------------------------------------------------------------------------------

    def run(self, requests: list[SimRequest], concurrency: int = 0) -> list[RequestResult]:
        """Every request's result, in order. `concurrency` > 0: a closed loop, that many in flight
        from time 0, each next request (in order) arriving when one ends; their own times unused."""
        if concurrency > 0:
            self._unsent = deque(requests)
            for _ in range(min(concurrency, len(requests))):
                self.loop.at(0.0, self._send_next)
        else:
            for request in requests:
                self.loop.at(request.arrival_s, lambda r=request: self._arrive(r))  # type: ignore[misc]
        total = len(requests)
        self.loop.run(until=lambda: len(self.results) == total)
        return [self.results[r.index] for r in requests]

    def _send_next(self) -> None:
        self._arrive(dataclasses.replace(self._unsent.popleft(), arrival_s=self.loop.now()))

    def _arrive(self, request: SimRequest) -> None:
        slo = self.spec.slo
        prompt = TracePrompt(request, self.spec.block_tokens, self.registry.index)
        shape = RequestShape(
            str(request.index), prompt, request.output_tokens, slo.default_ttft_ms, slo.default_tpot_ms,
            request.priority,
        )  # fmt: skip
        job = Job(request, self.spec.block_tokens, order=(-request.priority.rank, request.index))
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            placement = self.placer.place(shape)
        except (NoCapacity, SloOutOfReach, NoLiveWorker) as e:
            self._fail(job, _CODES.get(type(e), "RESOURCE_EXHAUSTED"), str(e))
            return
        finally:
            self.decision_cpu_ns.append(time.thread_time_ns() - start_cpu)
            self.decision_ns.append(time.perf_counter_ns() - start)
        delay_s = self.spec.profile.request_overhead_ms / 1000  # the calls before its prompt reaches a worker
        if delay_s > 0:
            self.loop.after(delay_s, lambda: self._start(job, placement))
        else:
            self._start(job, placement)

    def _start(self, job: Job, placement: Placement) -> None:
        decode = self.workers[placement.decode.worker_id]
        assert isinstance(decode, SimDecode)
        job.decode_id = decode.worker_id
        if placement.prefill is None:
            placement.decode.assigned += 1  # the flow holds its decode worker from the stream's start
            decode.submit_local(job)
            return
        slo = self.spec.slo
        give_up = self.loop.now() + min(self.spec.queue_timeout_s, slo.default_ttft_ms / 1000 or float("inf"))
        self._reserve(job, placement, give_up, _BACKOFF_S[0])

    def _reserve(self, job: Job, placement: Placement, give_up: float, delay: float) -> None:
        """capacity.reserve: the placed decode worker, then any other, then wait and try again."""
        assert placement.prefill is not None
        others = [w for w in self.registry.live(WorkerRole.DECODE) if w is not placement.decode]
        for worker in [placement.decode, *others]:
            decode = self.workers[worker.worker_id]
            assert isinstance(decode, SimDecode)
            if decode.reserve(job):
                self.placer.moved(str(job.request.index), worker)
                job.decode_id = decode.worker_id
                prefill = self.workers[placement.prefill.worker_id]
                assert isinstance(prefill, SimPrefill)
                prefill.submit(job)
                return
        if self.loop.now() + delay > give_up:
            self._fail(job, "RESOURCE_EXHAUSTED", "kv_cache: every decode worker is full")
            return
        self.loop.after(delay, lambda: self._reserve(job, placement, give_up, min(delay * 2, _BACKOFF_S[1])))

    def _prefilled(self, job: Job, prefill: SimPrefill) -> None:
        """The prompt is computed; the first token goes out when the last layer has landed."""
        num_bytes = job.prompt * self.spec.profile.kv_bytes_per_token
        exposed_ms = prefill.push_ms(num_bytes)
        prefill.pushes.append((num_bytes, exposed_ms))
        self.loop.after(exposed_ms / 1000, lambda: self._handed_off(job))

    def _handed_off(self, job: Job) -> None:
        """First token; the decode worker takes the request (its Decode.Generate call) the profile's
        hand-off time later."""
        self._first_token(job)
        self.registry.workers[job.decode_id].assigned += 1
        decode = self.workers[job.decode_id]
        assert isinstance(decode, SimDecode)
        handoff_s = self.spec.profile.handoff_ms / 1000
        if handoff_s > 0:
            self.loop.after(handoff_s, lambda: decode.join(job))
        else:
            decode.join(job)

    def _first_token(self, job: Job) -> None:
        job.first_token_s = self.loop.now()
        self.placer.prefilled(str(job.request.index))

    def _finished(self, job: Job) -> None:
        job.finished_s = self.loop.now()
        self.placer.ended(str(job.request.index), job.request.output_tokens)
        self.registry.workers[job.decode_id].assigned -= 1
        r = job.request
        assert job.first_token_s is not None
        self._done(RequestResult(
            r.index, True, r.prompt_tokens, r.output_tokens, scheduled_s=r.arrival_s, start_s=r.arrival_s,
            ttft_s=job.first_token_s - r.arrival_s, e2e_s=job.finished_s - r.arrival_s,
        ))  # fmt: skip

    def _fail(self, job: Job, code: str, error: str) -> None:
        self.placer.ended(str(job.request.index))
        r = job.request
        waited = self.loop.now() - r.arrival_s  # 0: refused at once
        self._done(RequestResult(r.index, False, r.prompt_tokens, scheduled_s=r.arrival_s, start_s=r.arrival_s,
                                 e2e_s=waited, code=code, error=error))  # fmt: skip

    def _done(self, result: RequestResult) -> None:
        self.results[result.index] = result
        if self._unsent:
            self.loop.after(0.0, self._send_next)  # after this event: a refusal ends inside _arrive
        if self.on_done is not None:
            self.on_done(result)
