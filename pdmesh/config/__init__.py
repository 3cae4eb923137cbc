"""Configuration: the only package that reads the environment (PDMESH_* variables).

A process's configuration is a tree of frozen dataclasses: SchedulerConfig or WorkerConfig at the
root, each component's own config a field of it (server, channel, engine, cache, batcher), so each
component is handed the narrowest config it needs. One loader (`env.from_env`) fills a tree from
PDMESH_<SECTION>_<FIELD> variables; the dataclasses sit one module per concern:

    env        the loader: from_env, env_name, ConfigError (nothing else calls os.environ,
               but for otel_export's look at the standard OTEL_* variables)
    transport  ServerConfig (PDMESH_SERVER_*), ChannelConfig (PDMESH_CHANNEL_*)
    telemetry  TelemetryConfig (PDMESH_TELEMETRY_*), LogFormat, otel_export
    scheduler  SchedulerConfig (PDMESH_SCHEDULER_*; its api_keys, both doors', PDMESH_API_KEYS),
               HttpConfig (PDMESH_HTTP_*), SloConfig (PDMESH_SLO_*), PolicyName, DoorKeys

The workers' and the KV store's trees live with their services (services/worker/config.py,
services/kvstore/config.py) and are loaded by the same `from_env`. Callers import from
`pdmesh.config`, whose names are these.
"""

from __future__ import annotations

from pdmesh.config.env import (
    PREFIX,
    ConfigError,
    MiB,
    check_positive,
    deprecated_settings,
    env_name,
    from_env,
    read_variable,
    setting,
    variable_of,
)
from pdmesh.config.scheduler import (
    API_KEYS,
    DoorKeys,
    HttpConfig,
    PolicyName,
    SchedulerConfig,
    SloConfig,
    door_keys,
)
from pdmesh.config.telemetry import LogFormat, OtelExport, OtlpProtocol, TelemetryConfig, otel_export
from pdmesh.config.transport import (
    COPY_SETTLE_S,
    ENGINE_STOP_S,
    KV_CLOSE_S,
    STOP_MARGIN_S,
    ChannelConfig,
    ServerConfig,
)

__all__ = [
    "API_KEYS",
    "COPY_SETTLE_S",
    "ENGINE_STOP_S",
    "KV_CLOSE_S",
    "PREFIX",
    "STOP_MARGIN_S",
    "ChannelConfig",
    "ConfigError",
    "DoorKeys",
    "HttpConfig",
    "LogFormat",
    "MiB",
    "OtelExport",
    "OtlpProtocol",
    "PolicyName",
    "SchedulerConfig",
    "ServerConfig",
    "SloConfig",
    "TelemetryConfig",
    "check_positive",
    "deprecated_settings",
    "door_keys",
    "env_name",
    "from_env",
    "otel_export",
    "read_variable",
    "setting",
    "variable_of",
]
