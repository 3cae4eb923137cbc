"""KV transfer metrics of a process that moves KV (workers, the KV store): the kvtransfer
telemetry hook (TransferObserver) counting bytes, durations and failures by direction.

Kept apart from metrics.py because it imports kvtransfer, which the scheduler never loads.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from kvtransfer.errors import TransferFailed
from kvtransfer.telemetry import Direction, TransferStats
from services.telemetry.metrics import TRANSFER_BUCKETS, counter, histogram


class TransferMetrics:
    """A TransferObserver: called on the transport's thread (prometheus_client is thread-safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = counter(registry, "kv_transfer_bytes", "KV bytes moved", "direction")
        self.seconds = histogram(
            registry, "kv_transfer_seconds", "Duration of one KV transfer", TRANSFER_BUCKETS, "direction"
        )
        self.failures = counter(registry, "kv_transfer_failures", "KV transfers that failed", "direction")
        for d in Direction:  # every series exists from the start, at 0
            self.bytes.labels(d.value)
            self.failures.labels(d.value)

    def on_complete(self, stats: TransferStats) -> None:
        self.bytes.labels(stats.direction.value).inc(stats.bytes)
        self.seconds.labels(stats.direction.value).observe(stats.seconds)

    def on_failure(self, error: TransferFailed, direction: Direction) -> None:
        self.failures.labels(direction.value).inc()
