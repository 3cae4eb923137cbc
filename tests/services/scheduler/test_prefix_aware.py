"""prefix_aware placement: affinity to the worker that holds a prompt's prefix, until the prefill
queued on it costs more than recomputing elsewhere; the KV store as a cheaper second best."""

from __future__ import annotations

from engine.block_hash import chain_hashes
from engine.block_pool import KVEvents
from engine.kv_layout import KVLayout
from pdmesh.config import SloConfig
from pdmesh.enums import WorkerHealth, WorkerRole
from services.scheduler.ledger import Ledger
from services.scheduler.placer import Placer
from services.scheduler.policy import FETCH_COST, PrefixAware, RequestShape
from services.scheduler.predictor import Calibration, CalibrationSettings
from services.scheduler.prefix import PromptBlocks
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry, Worker
from services.scheduler.reports import Capacity, LoadReport, WorkerInfo

LAYOUT = KVLayout("fp", "float32", 16, 2, 2, 8)
PROMPT = list(range(1, 1026))  # 1025 tokens: 64 reusable blocks of 16
HASHES = chain_hashes(PROMPT[:1024], 16, "fp")


def worker(worker_id: str, role: WorkerRole, free: int = 100) -> Worker:
    info = WorkerInfo(worker_id, role, f"{worker_id}:1", f"{worker_id}:2", "m", LAYOUT, Capacity(100))
    w = Worker(info, None, Calibration(CalibrationSettings()).for_worker("", "m"))  # a policy never calls a worker
    w.load = LoadReport(worker_id, num_kv_blocks_free=free, num_kv_blocks_total=100)
    return w


def shape(index: PrefixIndex, stores: tuple[str, ...] = ()) -> RequestShape:
    return RequestShape("r", PromptBlocks(PROMPT, index), 16, 0.0, 0.0, stores=stores)


def holding(index: PrefixIndex, location: str, blocks: int) -> None:
    index.apply(location, LAYOUT, KVEvents(snapshot=True, stored=tuple(HASHES[:blocks])))


def test_the_worker_holding_the_prefix_gets_the_request_until_its_queue_outweighs_recomputing() -> None:
    index = PrefixIndex()
    p0, p1, d0 = worker("prefill-0", WorkerRole.PREFILL), worker("prefill-1", WorkerRole.PREFILL), worker(
        "decode-0", WorkerRole.DECODE
    )
    holding(index, "prefill-1", 64)  # 1024 of the 1025 tokens
    policy = PrefixAware(local_prefill_max_tokens=32)

    assert policy.choose(shape(index), [p0, p1], [d0]).prefill is p1
    p1.queued_prefill_tokens = 1000  # 1000 + 1 still beats computing 1025 on prefill-0
    assert policy.choose(shape(index), [p0, p1], [d0]).prefill is p1
    p1.queued_prefill_tokens = 1100  # saturated: recomputing elsewhere is cheaper now
    assert policy.choose(shape(index), [p0, p1], [d0]).prefill is p0


def test_the_store_makes_any_worker_nearly_as_good_and_never_worse_than_computing() -> None:
    index = PrefixIndex()
    p0, p1, d0 = worker("prefill-0", WorkerRole.PREFILL), worker("prefill-1", WorkerRole.PREFILL), worker(
        "decode-0", WorkerRole.DECODE
    )
    holding(index, "kvstore-0", 64)
    holding(index, "prefill-1", 32)  # its own cache holds half; the store has the rest
    request = shape(index, stores=("kvstore-0",))

    assert request.uncached_tokens(p0) == request.uncached_tokens(p1) == 1
    assert request.prefill_cost(p0) == 1 + FETCH_COST * 1024
    assert request.prefill_cost(p1) == 1 + FETCH_COST * 512
    # The decode worker could fetch it all and compute one token itself: it does.
    assert PrefixAware(32).choose(request, [p0, p1], [d0]).prefill is None
    # Hand-offs only: the worker with half of it, until waiting there costs more than fetching.
    assert PrefixAware(0).choose(request, [p0, p1], [d0]).prefill is p1
    p1.queued_prefill_tokens = 100
    assert PrefixAware(0).choose(request, [p0, p1], [d0]).prefill is p0


def test_a_decode_worker_that_would_compute_few_tokens_prefills_locally() -> None:
    index = PrefixIndex()
    p0, d0, d1 = worker("prefill-0", WorkerRole.PREFILL), worker("decode-0", WorkerRole.DECODE), worker(
        "decode-1", WorkerRole.DECODE, free=10
    )
    holding(index, "decode-1", 64)  # a conversation's earlier turn lives there: one token to compute

    placement = PrefixAware(local_prefill_max_tokens=32).choose(shape(index), [p0], [d0, d1])
    assert (placement.decode, placement.prefill) == (d1, None)
    # Without the prefix anywhere, the least loaded decode worker and a hand-off.
    placement = PrefixAware(local_prefill_max_tokens=32).choose(shape(PrefixIndex()), [p0], [d0, d1])
    assert (placement.decode, placement.prefill) == (d0, p0)


class Mesh:
    """Two prefill workers and a decode worker that have reported nothing yet, the placer over
    them (prefix_aware, every prompt handed off), on a clock the test sets."""

    def __init__(self) -> None:
        self.now = 100.0
        self.registry = Registry(3.0, None, clock=lambda: self.now)
        self.placer = Placer(PrefixAware(local_prefill_max_tokens=0), self.registry, Ledger(self.registry.clock),
                             SloConfig())  # fmt: skip
        for name, role in (("prefill-0", WorkerRole.PREFILL), ("prefill-1", WorkerRole.PREFILL),
                           ("decode-0", WorkerRole.DECODE)):  # fmt: skip
            self.registry.add(WorkerInfo(name, role, f"{name}:1", f"{name}:2", "m", LAYOUT, Capacity(1000)), None)
        self.placed = 0
        self.reports = 0

    def later(self, seconds: float) -> None:
        """`seconds` on, every worker having reported (nothing of its cache: no KV events)."""
        self.now += seconds
        self.reports += 1
        for worker_id in self.registry.workers:
            self.registry.report(LoadReport(worker_id, self.reports, health=WorkerHealth.SERVING))

    def place(self, group: int, shared: int = 1024, own: int = 64) -> str:
        """A request of prefix group `group` (`shared` tokens, then `own` of its own): its prefill worker."""
        self.placed += 1
        tokens = [group] * shared + [10_000 + self.placed] * own
        request = RequestShape(f"r{self.placed}", PromptBlocks(tokens, self.registry.index), 16, 0.0, 0.0)
        placement = self.placer.place(request)
        assert placement.prefill is not None
        return placement.prefill.worker_id


def test_a_prefix_groups_first_requests_stick_before_any_worker_reports_the_prefix() -> None:
    mesh = Mesh()
    # Two groups arrive together (bench serve's shared-prefix load); no report comes in between.
    # Each group's prefix is computed once: its later requests queue 64 tokens each behind it.
    assert [mesh.place(g) for g in (1, 2, 1, 2, 1, 2)] == ["prefill-0", "prefill-1"] * 3
    p0 = mesh.registry.workers["prefill-0"]
    assert p0.queued_prefill_tokens == 1088 + 64 + 64

    # Sticky until saturated: group 1 stays on prefill-0 while its queue plus 64 tokens costs no
    # more than computing all 1088 behind prefill-1's queue (1216 too): 17 more of them.
    assert {mesh.place(1) for _ in range(17)} == {"prefill-0"}
    assert mesh.place(1) == "prefill-1"


def test_a_mark_goes_with_a_request_that_fails_and_lapses_when_the_worker_never_reports_it() -> None:
    mesh = Mesh()
    assert mesh.place(1) == "prefill-0"  # r1
    mesh.placer.ended("r1")  # failed before its first token: prefill-0 may hold nothing of group 1
    assert mesh.place(0, shared=0, own=100) == "prefill-0"  # r2: a short prompt, both idle: the first wins
    assert mesh.place(1) == "prefill-1"  # r3: 100 + 1088 on prefill-0 against 1088 here

    mesh = Mesh()
    assert mesh.place(1) == "prefill-0"  # r1
    mesh.placer.prefilled("r1")  # its first token: prefill-0's reports should carry group 1 within 3 s
    assert mesh.place(0, shared=0, own=100) == "prefill-0"  # r2
    assert mesh.place(1) == "prefill-0"  # r3: 100 + 64 on prefill-0 against 1088 on prefill-1
    mesh.placer.ended("r3")
    mesh.later(3.1)  # and they never did (it evicted them, say): the mark lapses
    assert mesh.place(1) == "prefill-1"  # r4: 100 + 1088 on prefill-0 against 1088 here
