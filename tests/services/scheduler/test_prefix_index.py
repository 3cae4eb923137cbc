"""The prefix index: which workers and stores hold each block, and how long a leading run of a
prompt's chain each one holds."""

from __future__ import annotations

from dataclasses import replace

from engine.block_hash import chain_hashes
from engine.block_pool import KVEvents
from engine.kv_layout import KVLayout
from pdmesh.config import ChannelConfig
from pdmesh.enums import WorkerHealth
from services.kvstore.stats import StoreStatus
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Registry
from services.scheduler.reports import StoreInfo, StoreReport

LAYOUT = KVLayout("fp", "float32", 4, 2, 2, 8)
CHAIN = chain_hashes(list(range(40)), 4, "fp")  # 10 blocks


def test_each_location_holds_the_leading_run_it_has() -> None:
    index = PrefixIndex()
    index.apply("decode-0", LAYOUT, KVEvents(snapshot=True, stored=tuple(CHAIN[:6])))
    index.apply("prefill-0", LAYOUT, KVEvents(snapshot=True, stored=(CHAIN[0], CHAIN[1], CHAIN[3])))  # a gap
    index.apply("kvstore-0", LAYOUT, KVEvents(snapshot=True, stored=tuple(CHAIN)))
    index.apply("prefill-1", LAYOUT, KVEvents(snapshot=True, stored=tuple(CHAIN[1:])))  # no first block

    match = index.match(LAYOUT, CHAIN)
    assert match.blocks == {"decode-0": 6, "prefill-0": 2, "kvstore-0": 10}
    assert match.tokens("decode-0") == 24 and match.tokens("prefill-1") == 0
    assert match.best(["prefill-0", "prefill-1"]) == 8


def test_changes_apply_a_snapshot_replaces_and_a_location_that_leaves_is_forgotten() -> None:
    index = PrefixIndex()
    index.apply("w", LAYOUT, KVEvents(snapshot=True, stored=tuple(CHAIN[:4])))
    index.apply("w", LAYOUT, KVEvents(stored=(CHAIN[4],), removed=(CHAIN[2],)))
    assert index.match(LAYOUT, CHAIN).blocks == {"w": 2}
    assert index.num_blocks("w") == 4

    index.apply("w", LAYOUT, KVEvents(snapshot=True, stored=(CHAIN[0],)))
    assert index.match(LAYOUT, CHAIN).blocks == {"w": 1}
    index.forget("w")
    assert index.match(LAYOUT, CHAIN).blocks == {} and index.num_blocks("w") == 0


def test_blocks_of_another_layout_never_match() -> None:
    index = PrefixIndex()
    index.apply("kvstore-0", replace(LAYOUT, dtype="bfloat16"), KVEvents(snapshot=True, stored=tuple(CHAIN)))
    assert index.match(LAYOUT, CHAIN).blocks == {}


def test_a_store_reports_its_namespaces_and_a_lost_report_asks_for_a_snapshot() -> None:
    registry = Registry(stale_after_s=60, channel_config=ChannelConfig())
    registry.register_store(StoreInfo("kvstore-0", "127.0.0.1:7", "127.0.0.1:8"))

    def report(seq: int, events: KVEvents) -> StoreReport:
        return StoreReport("kvstore-0", seq, health=WorkerHealth.SERVING, status=StoreStatus(),
                           events=((LAYOUT, events),))  # fmt: skip

    assert registry.report_store(report(1, KVEvents(snapshot=True, stored=tuple(CHAIN[:3])))) == (True, False)
    assert registry.index.match(LAYOUT, CHAIN).blocks == {"kvstore-0": 3}
    assert registry.report_store(report(3, KVEvents(stored=(CHAIN[3],)))) == (True, True)
    assert registry.index.match(LAYOUT, CHAIN).blocks == {"kvstore-0": 3}
    live = registry.live_store()
    assert live is not None and live.info.address == "127.0.0.1:7"
    assert registry.report_store(StoreReport("ghost")) == (False, False)


def test_a_placement_marks_its_blocks_held_until_they_are_reported_or_its_grace_lapses() -> None:
    now = [100.0]
    index = PrefixIndex(clock=lambda: now[0])
    index.expect("r1", "prefill-0", LAYOUT, CHAIN[:6])  # placed: prefill-0 will hold 6 blocks
    assert index.match(LAYOUT, CHAIN).blocks == {"prefill-0": 6}
    index.expect("r2", "prefill-0", LAYOUT, CHAIN[:8])  # the same prefix, longer: both marks count
    index.drop("r2")  # r2 ended before its first token
    assert index.match(LAYOUT, CHAIN).blocks == {"prefill-0": 6}

    index.settle("r1", grace_s=3.0)  # r1's first token: the worker's reports follow within 3 s
    now[0] += 2.9
    index.settle("r1", grace_s=3.0)  # a repeat changes nothing
    assert index.match(LAYOUT, CHAIN).blocks == {"prefill-0": 6}
    index.apply("prefill-0", LAYOUT, KVEvents(snapshot=True, stored=tuple(CHAIN[:5])))  # it kept 5
    now[0] += 0.2
    assert index.match(LAYOUT, CHAIN).blocks == {"prefill-0": 5}  # the mark lapsed: reports rule


def test_a_worker_that_leaves_loses_its_marks() -> None:
    index = PrefixIndex()
    index.expect("r1", "prefill-0", LAYOUT, CHAIN[:6])
    index.expect("r2", "prefill-1", LAYOUT, CHAIN[:3])
    version = index.version
    index.forget("prefill-0")
    assert index.version != version
    assert index.match(LAYOUT, CHAIN).blocks == {"prefill-1": 3}
