"""The KV store's Prometheus metrics: its counters and occupancy, and the KV it moves.

The store's own figures (StoreCounters, StoreStatus) are read when Prometheus scrapes, from a
snapshot the event loop takes (`refresh`), so the scrape thread never walks the store's tables
while the loop changes them. Transfers are counted by the transport's hook (TransferMetrics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.kvstore.stats import StoreStatus
from services.telemetry.metrics import PREFIX
from services.telemetry.transfers import TransferMetrics

_COUNTERS = {  # StoreCounters field -> what it counts
    "lookups": "Lookups served",
    "lookup_blocks": "Blocks asked for by lookups",
    "lookup_hit_blocks": "Blocks lookups found (the store's cache hits)",
    "fetches": "Fetches served",
    "fetched_blocks": "Blocks pushed to workers by fetches",
    "fetches_refused": "Fetches refused: a block gone or of another generation",
    "fetches_failed": "Fetches whose push failed",
    "offers": "Offers answered",
    "stored_blocks": "Blocks stored",
    "demoted_blocks": "Blocks moved from memory to disk",
    "promoted_blocks": "Blocks moved from disk to memory for a fetch",
    "evicted_blocks": "Blocks dropped from the store",
    "restored_blocks": "Blocks found on disk at start",
    "leases_expired": "Shared-memory fetches and offers whose lease ran out (their worker died or stalled)",
}
_GAUGES = {  # StoreStatus field -> what it measures
    "memory_used_bytes": "Bytes of KV held in memory",
    "memory_capacity_bytes": "Memory for KV, per namespace",
    "disk_used_bytes": "Bytes of KV held on disk",
    "disk_capacity_bytes": "Disk for KV, per namespace (0: no disk tier)",
    "num_namespaces": "KV layouts served",
    "num_memory_blocks": "Blocks in memory",
    "num_disk_blocks": "Blocks on disk",
}


class StoreMetrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.transfers = TransferMetrics(self.registry)
        self._status = StoreStatus()
        self.registry.register(self)

    def refresh(self, status: StoreStatus) -> None:
        """A snapshot to serve (counters copied: the store keeps counting in its own)."""
        self._status = dataclasses.replace(status, counters=dataclasses.replace(status.counters))

    def collect(self) -> Iterator[Metric]:
        status = self._status
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}kvstore_{name}", doc, value=getattr(status.counters, name))
        for name, doc in _GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}kvstore_{name}", doc, value=getattr(status, name))
        yield GaugeMetricFamily(
            f"{PREFIX}kvstore_fetches_in_flight", "Fetches being pushed", value=status.counters.fetches_in_flight
        )
        yield GaugeMetricFamily(
            f"{PREFIX}kvstore_leases", "Shared-memory fetches and offers under way", value=status.counters.leases
        )
