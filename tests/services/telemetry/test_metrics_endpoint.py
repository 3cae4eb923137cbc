"""A service's /metrics: served over HTTP from its own registry, parseable by Prometheus'
parser; a port already taken fails the start naming the setting."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.config import ConfigError, TelemetryConfig
from services.telemetry.metrics import MetricsEndpoint, counter, histogram


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        s.name + str(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


def test_metrics_are_served_with_the_pdmesh_prefix() -> None:
    registry = CollectorRegistry()
    ttft = histogram(registry, "time_to_first_token_seconds", "TTFT", (0.1, 1.0, 10.0, 100.0))
    placements = counter(registry, "placements", "Placements by plan", "plan")
    endpoint = MetricsEndpoint.start(registry, TelemetryConfig(metrics_port=0, metrics_host="127.0.0.1"))
    assert endpoint is not None
    try:
        ttft.observe(0.05)
        ttft.observe(12.0)  # past 10 s: still in a bucket of its own
        placements.labels("disaggregated").inc(3)
        samples = scrape(endpoint.port)
    finally:
        endpoint.close()
    assert samples["pdmesh:time_to_first_token_seconds_count[]"] == 2
    assert samples["pdmesh:time_to_first_token_seconds_bucket[('le', '10.0')]"] == 1
    assert samples["pdmesh:time_to_first_token_seconds_bucket[('le', '100.0')]"] == 2
    assert samples["pdmesh:placements_total[('plan', 'disaggregated')]"] == 3


def test_no_port_serves_nothing() -> None:
    assert MetricsEndpoint.start(CollectorRegistry(), TelemetryConfig()) is None


def test_a_taken_port_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="metrics_port: 127.0.0.1:.* cannot be served.*--metrics-port"):
            MetricsEndpoint.start(CollectorRegistry(), TelemetryConfig(metrics_port=port, metrics_host="127.0.0.1"))
