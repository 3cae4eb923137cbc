"""Logs, metrics and OpenTelemetry export of a service process: TelemetryConfig
(PDMESH_TELEMETRY_*), and `otel_export`, which reads only whether the standard OTEL_* variables
ask for an OTLP exporter at all.

The one sanctioned exception to "only PDMESH_* variables": OpenTelemetry's standard OTEL_*
variables (exporter endpoint, protocol, headers, sampler, resource attributes) are read by the
OpenTelemetry SDK itself, as every OpenTelemetry user expects; with nothing set nothing is
exported, and services/telemetry hands the rest to the SDK.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pdmesh.config.env import ConfigError


class LogFormat(enum.Enum):
    JSON = "json"  # one JSON object per line: what services write for collectors
    CONSOLE = "console"  # readable key=value lines, for a person at a terminal
    AUTO = "auto"  # console when stderr is a terminal, JSON otherwise


@dataclass(frozen=True)
class TelemetryConfig:
    """Logs and metrics of one service process. Loaded from PDMESH_TELEMETRY_*.

    Traces and OpenTelemetry metrics are configured by the standard OTEL_* variables instead (see
    the module docstring and `otel_export`).
    """

    log_level: str = "info"
    log_format: LogFormat = LogFormat.AUTO
    # Prometheus /metrics over HTTP: None serves none, 0 any free port (logged at start).
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError("log_level", f"is {self.log_level!r}; use one of {', '.join(_LOG_LEVELS)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError("metrics_port", f"is {self.metrics_port}; use 0 (any free port) to 65535, or empty")


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class OtlpProtocol(enum.Enum):
    GRPC = "grpc"
    HTTP = "http/protobuf"


@dataclass(frozen=True)
class OtelExport:
    """Which OpenTelemetry signals a process exports over OTLP, and how; None: not exported."""

    traces: OtlpProtocol | None = None
    metrics: OtlpProtocol | None = None

    @property
    def any(self) -> bool:
        return self.traces is not None or self.metrics is not None


def otel_export(environ: Mapping[str, str] | None = None) -> OtelExport:
    """Read from the standard OTEL_* variables whether traces and metrics are exported.

    A signal is exported when an OTLP endpoint is set for it (OTEL_EXPORTER_OTLP_ENDPOINT, or the
    signal's own OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT), unless OTEL_SDK_DISABLED is true or
    OTEL_<SIGNAL>_EXPORTER is "none". The protocol is OTEL_EXPORTER_OTLP[_<SIGNAL>]_PROTOCOL
    (grpc, the default, or http/protobuf). Endpoint, headers, timeouts and the rest the SDK's
    exporters read themselves.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return OtelExport()
    return OtelExport(_otlp_protocol(env, "TRACES"), _otlp_protocol(env, "METRICS"))


def _otlp_protocol(env: Mapping[str, str], signal: str) -> OtlpProtocol | None:
    if env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() == "none":
        return None
    if not (env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    name = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    raw = (env.get(name) or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    try:
        return OtlpProtocol(raw)
    except ValueError:
        raise ConfigError(name, f"is {raw!r}; use grpc or http/protobuf") from None
