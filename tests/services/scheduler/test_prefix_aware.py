"""prefix_aware placement: affinity to the worker that holds a prompt's prefix, until the prefill
queued on it costs more than recomputing elsewhere; the KV store as a cheaper second best."""

from __future__ import annotations

from engine.block_hash import chain_hashes
from engine.block_pool import KVEvents
from engine.kv_layout import KVLayout
from pdmesh.enums import WorkerRole
from services.scheduler.policy import FETCH_COST, PrefixAware, RequestShape
from services.scheduler.predictor import Calibration, CalibrationSettings
from services.scheduler.prefix import PromptBlocks
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Worker
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
