"""Prometheus metrics of each service, named in vLLM's style with the `pdmesh:` prefix, and the
/metrics endpoint that serves them.

Each service builds its metrics on a registry of its own (no process-wide default registry, so
several services can share a test process) and serves it with `MetricsEndpoint.start` when its
TelemetryConfig names a port. Latency histograms reach far past 10 s: a request stuck behind a
full cache must land in a bucket that says so, not in +Inf. prometheus_client is thread-safe,
so the KV transport's thread records transfers directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pdmesh.config import ConfigError, TelemetryConfig

log = structlog.get_logger(__name__)

PREFIX = "pdmesh:"
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TRANSFER_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


def histogram(registry: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
    return Histogram(PREFIX + name, doc, labels, registry=registry, buckets=buckets)


def counter(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Counter:
    return Counter(PREFIX + name, doc, labels, registry=registry)


def gauge(registry: CollectorRegistry, name: str, doc: str, *labels: str) -> Gauge:
    return Gauge(PREFIX + name, doc, labels, registry=registry)


@dataclass
class MetricsEndpoint:
    """A started /metrics HTTP server (a daemon thread of prometheus_client's)."""

    server: WSGIServer
    port: int

    @classmethod
    def start(cls, registry: CollectorRegistry, config: TelemetryConfig) -> MetricsEndpoint | None:
        if config.metrics_port is None:
            return None
        try:
            server, _thread = start_http_server(config.metrics_port, config.metrics_host, registry=registry)
        except OSError as e:
            raise ConfigError(
                "metrics_port", f"{config.metrics_host}:{config.metrics_port} cannot be served ({e.strerror}); "
                "give another port (--metrics-port, PDMESH_TELEMETRY_METRICS_PORT) or leave it empty for none",
            ) from None  # fmt: skip
        port = server.server_address[1]
        log.info("serving metrics", port=port, path="/metrics")
        return cls(server, port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
