"""`pdmesh status`: the mesh as its scheduler sees it — every worker's health and load, and the KV
store's health, capacity, use, hit counts and shared-memory leases — as tables, or as one JSON object (--json)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import grpc

from pdmesh.client import AsyncClient, ClusterState, KVStoreState

MiB = 1 << 20


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f}"


def worker_rows(state: ClusterState) -> list[list[str]]:
    rows = [["worker", "role", "health", "kv blocks free", "running", "waiting", "reserved", "transfers"]]
    for w in state.workers:
        rows.append([
            w.worker_id, w.role.value if w.role else "?", w.health.value if w.health else "?",
            f"{w.num_kv_blocks_free}/{w.num_kv_blocks_total}", str(w.num_running_requests),
            str(w.num_waiting_requests), str(w.num_kv_reservations), str(w.num_kv_transfers_in_flight),
        ])  # fmt: skip
    return rows


def store_rows(store: KVStoreState) -> list[list[str]]:
    """One store's figures, a (label, value) per line."""
    disk = (f"{_mib(store.disk_used_bytes)} of {_mib(store.disk_capacity_bytes)} MiB per layout, "
            f"{store.num_disk_blocks} blocks" if store.disk_capacity_bytes else "none")  # fmt: skip
    shared = (f"a file the workers of its host map: {store.num_leases} leases held, "
              f"{store.num_leases_expired} ran out" if store.shared_memory
              else "no (private memory: workers fetch and offer over UCX)")  # fmt: skip
    return [
        ["kv store", f"{store.store_id} at {store.address}, {store.health.value if store.health else '?'}"],
        ["memory", f"{_mib(store.memory_used_bytes)} of {_mib(store.memory_capacity_bytes)} MiB per layout, "
                   f"{store.num_memory_blocks} blocks, {store.num_namespaces} layout(s)"],
        ["disk", disk],
        ["lookups", f"{store.num_lookups}: {store.num_lookup_hit_blocks} of {store.num_lookup_blocks} blocks hit "
                    f"({_pct(store.num_lookup_hit_blocks, store.num_lookup_blocks)})"],
        ["fetches", f"{store.num_fetches} ({store.num_fetched_blocks} blocks), {store.num_fetches_refused} refused "
                    f"as stale, {store.num_fetches_failed} failed, {store.num_fetches_in_flight} in flight"],
        ["offers", f"{store.num_offers}: {store.num_stored_blocks} blocks stored"],
        ["eviction", f"{store.num_demoted_blocks} to disk, {store.num_promoted_blocks} back, "
                     f"{store.num_evicted_blocks} dropped, {store.num_restored_blocks} restored at start"],
        ["shared", shared],
        ["indexed", f"{store.num_indexed_blocks} blocks in the scheduler's prefix index"],
    ]  # fmt: skip


def render(state: ClusterState) -> str:
    lines = [f"policy {state.policy}; {state.num_running_requests} running, {state.num_queued_requests} queued", ""]
    rows = worker_rows(state)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    for store in state.kv_stores:
        lines.append("")
        lines += [f"{label:<9} {value}" for label, value in store_rows(store)]
    if not state.kv_stores:
        lines += ["", "kv store  none registered (prefixes are not shared between workers)"]
    return "\n".join(lines)


async def run_status(args: argparse.Namespace) -> int:
    try:
        async with AsyncClient(args.target) as client:
            state = await client.cluster_state()
    except grpc.aio.AioRpcError as e:
        print(f"pdmesh status: {args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(state), default=lambda v: getattr(v, "value", str(v)), indent=2))
    else:
        print(render(state))
    return 0
