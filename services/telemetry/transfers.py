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
    """A TransferObserver: called on the transport's thread (prometheus_client is thread-safe).

    Bytes, durations and failures by direction and peer: the other end's KV listener address
    ("host:port"; "unknown" before a failed ticket ever heard from it). One series per peer
    process, not per request or ticket, so the count stays that of the mesh's workers and stores
    (and their restarts on new ports); which link is slow or failing shows without a trace.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = counter(registry, "kv_transfer_bytes", "KV bytes moved", "direction", "peer")
        self.seconds = histogram(
            registry, "kv_transfer_seconds", "Duration of one KV transfer", TRANSFER_BUCKETS, "direction", "peer"
        )
        self.failures = counter(registry, "kv_transfer_failures", "KV transfers that failed", "direction", "peer")

    def on_complete(self, stats: TransferStats) -> None:
        peer = _peer(stats.peer)
        self.bytes.labels(stats.direction.value, peer).inc(stats.bytes)
        self.seconds.labels(stats.direction.value, peer).observe(stats.seconds)

    def on_failure(self, error: TransferFailed, direction: Direction) -> None:
        self.failures.labels(direction.value, _peer(error.peer)).inc()


def _peer(address: str) -> str:
    return address or "unknown"
