"""Placement sees the prefix caches: the scheduler hashes each prompt with the engine's chain
hashes and counts the tokens a worker's reported cache already holds, and the registry keeps each
worker's cached hashes from the changes its load reports carry."""

from __future__ import annotations

import asyncio

from scheduler_mesh import Mesh, MeshFactory
from scripted_workers import BLOCK_SIZE, LAYOUT, expected_tokens

from engine.block_hash import chain_hashes
from engine.block_pool import KVEvents
from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from pdmesh.client import ExecutionPlan
from pdmesh.config import ChannelConfig
from pdmesh.enums import WorkerHealth, WorkerRole
from services.scheduler.registry import Registry
from services.scheduler.reports import Capacity, LoadReport, WorkerInfo

PROMPT = list(range(1, 101))  # 100 tokens: 6 full blocks of 16 may be reused, the 7th holds the last token


async def test_a_prompt_the_decode_worker_holds_cached_is_prefilled_there(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)  # local prefill up to 32 uncached tokens
    first = [c async for c in mesh.client.generate(PROMPT, max_tokens=2, seed=4)]
    assert first[-1].placement is not None and first[-1].placement.plan is ExecutionPlan.DISAGGREGATED

    # The decode worker reports 6 blocks of the prompt cached: 96 tokens, 4 left to compute.
    mesh.decode[0].cached = tuple(chain_hashes(PROMPT[:96], BLOCK_SIZE, LAYOUT.model_fingerprint))
    await reports_after_now(mesh, "decode-0")
    again = [c async for c in mesh.client.generate(PROMPT, max_tokens=2, seed=4)]

    assert again[-1].placement is not None and again[-1].placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert [t for c in again for t in c.token_ids] == expected_tokens(4, 100, 2)
    assert len(mesh.prefill_servicer().calls) == 1


async def reports_after_now(mesh: Mesh, worker_id: str, count: int = 2) -> None:
    """Until the scheduler has `count` more reports of the worker (so one was taken after now)."""
    seen: list[int] = []
    for _ in range(500):
        state = await mesh.cluster()
        last = next(w.last_report_unix_ms for w in state.workers if w.info.worker_id == worker_id)
        if not seen or last != seen[-1]:
            seen.append(last)
        if len(seen) > count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{worker_id} stopped reporting")


def report(seq: int, events: KVEvents) -> LoadReport:
    return LoadReport("decode-0", report_seq=seq, health=WorkerHealth.SERVING, kv_events=events)


def test_cache_events_build_the_index_and_a_lost_report_asks_for_a_snapshot() -> None:
    registry = Registry(stale_after_s=60, channel_config=ChannelConfig())
    layout = KVLayout("fp", "float32", 4, 2, 2, 8)
    info = WorkerInfo("decode-0", WorkerRole.DECODE, "127.0.0.1:1", "127.0.0.1:2", "m", layout, Capacity())
    registry.add(info, None)
    h = [BlockHash(i) for i in range(5)]

    def held() -> set[BlockHash]:
        return {x for x in h if registry.index.match(layout, [x]).blocks.get("decode-0")}

    assert registry.report(report(1, KVEvents(snapshot=True, stored=(h[0], h[1])))) == (True, False)
    assert registry.report(report(2, KVEvents(stored=(h[2],), removed=(h[0],)))) == (True, False)
    assert held() == {h[1], h[2]}

    # Report 3 never arrived: its changes are unknown, so 4's are not applied and a snapshot is wanted.
    assert registry.report(report(4, KVEvents(stored=(h[3],)))) == (True, True)
    assert held() == {h[1], h[2]}
    assert registry.report(report(5, KVEvents(snapshot=True, stored=(h[4],)))) == (True, False)
    assert held() == {h[4]}
    assert registry.report(LoadReport("ghost")) == (False, False)
