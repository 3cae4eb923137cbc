"""Which KV listeners the registry names to each worker to connect to ahead of its tickets
(Registry.kv_peers, in every ReportLoad answer): a prefill worker's live decode workers of its
layout and the live store; a decode worker only the store."""

from __future__ import annotations

from dataclasses import replace

from engine.kv_layout import KVLayout
from pdmesh.enums import WorkerHealth, WorkerRole
from services.scheduler.registry import Registry
from services.scheduler.reports import Capacity, LoadReport, StoreInfo, WorkerInfo

LAYOUT = KVLayout("fp", "float32", 16, 2, 2, 8)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def info(name: str, role: WorkerRole, layout: KVLayout = LAYOUT) -> WorkerInfo:
    return WorkerInfo(name, role, f"{name}:1", f"{name}:kv", "m", layout, Capacity(100))


def report(name: str, seq: int, health: WorkerHealth = WorkerHealth.SERVING) -> LoadReport:
    return LoadReport(worker_id=name, report_seq=seq, health=health)


def test_a_prefill_worker_is_told_its_live_decode_workers_of_its_layout_and_the_store() -> None:
    clock = Clock()
    registry = Registry(3.0, None, clock=clock)
    registry.add(info("prefill-0", WorkerRole.PREFILL), None)
    registry.add(info("decode-0", WorkerRole.DECODE), None)
    registry.add(info("decode-1", WorkerRole.DECODE), None)
    registry.add(info("decode-other", WorkerRole.DECODE, replace(LAYOUT, head_dim=16)), None)
    registry.add(info("prefill-1", WorkerRole.PREFILL), None)
    assert registry.kv_peers("prefill-0") == ["decode-0:kv", "decode-1:kv"]
    assert registry.kv_peers("decode-0") == []
    assert registry.kv_peers("unknown") == []

    registry.register_store(StoreInfo("store-0", "store:1", "store:kv"))
    assert registry.kv_peers("prefill-0") == ["decode-0:kv", "decode-1:kv", "store:kv"]
    assert registry.kv_peers("decode-0") == ["store:kv"]

    # A draining decode worker leaves the list, and so does everything whose reports stopped.
    registry.report(report("decode-0", 1, WorkerHealth.DRAINING))
    assert registry.kv_peers("prefill-0") == ["decode-1:kv", "store:kv"]
    clock.now = 4.0
    assert registry.kv_peers("prefill-0") == []


def test_the_list_follows_joins_deaths_and_returns_at_once() -> None:
    # kv_peers keeps the decode listeners between reports; a change of who is live rebuilds them.
    clock = Clock()
    registry = Registry(3.0, None, clock=clock)
    registry.add(info("prefill-0", WorkerRole.PREFILL), None)
    decode = registry.add(info("decode-0", WorkerRole.DECODE), None)
    assert registry.kv_peers("prefill-0") == ["decode-0:kv"]

    registry.add(info("decode-1", WorkerRole.DECODE), None)
    assert registry.kv_peers("prefill-0") == ["decode-0:kv", "decode-1:kv"]
    registry.mark_dead(decode)
    assert registry.kv_peers("prefill-0") == ["decode-1:kv"]
    registry.report(report("decode-0", 1))
    assert registry.kv_peers("prefill-0") == ["decode-0:kv", "decode-1:kv"]
