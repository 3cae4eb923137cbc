"""The KV store's /metrics: its counters and occupancy as of the last snapshot, and the KV
it moved, in Prometheus' text format."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvtransfer.errors import TransferFailed
from kvtransfer.telemetry import Direction, TransferStats
from services.kvstore.stats import StoreCounters, StoreStatus
from services.kvstore.telemetry import StoreMetrics


def samples(metrics: StoreMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_the_store_serves_its_last_snapshot_and_its_transfers() -> None:
    metrics = StoreMetrics()
    counters = StoreCounters(lookups=3, lookup_blocks=12, lookup_hit_blocks=9, stored_blocks=5)
    metrics.refresh(StoreStatus(memory_used_bytes=4096, num_memory_blocks=5, counters=counters))
    counters.lookups += 1  # the store counts on; /metrics shows the snapshot until the next refresh
    metrics.transfers.on_complete(TransferStats("t1", "127.0.0.1:1", Direction.RECV, 2048, 0.01))
    metrics.transfers.on_failure(TransferFailed("127.0.0.1:1", "t2", 0, "lost"), Direction.SEND)
    metrics.transfers.on_failure(TransferFailed("", "t3", 0, "lease expired"), Direction.RECV)  # never heard from
    got = samples(metrics)
    assert got["pdmesh:kvstore_lookups_total"] == 3
    assert got["pdmesh:kvstore_lookup_hit_blocks_total"] == 9
    assert got["pdmesh:kvstore_memory_used_bytes"] == 4096
    assert got["pdmesh:kv_transfer_bytes_total{recv}{127.0.0.1:1}"] == 2048  # by direction and peer
    assert got["pdmesh:kv_transfer_failures_total{send}{127.0.0.1:1}"] == 1
    assert got["pdmesh:kv_transfer_failures_total{recv}{unknown}"] == 1
