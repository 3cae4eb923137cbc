"""Configuration: the only module that reads the environment.

A process's configuration is a tree of frozen dataclasses: SchedulerConfig or WorkerConfig at the
root, each component's own config a field of it (server, channel, engine, cache, batcher), so each
component is handed the narrowest config it needs. One loader fills a tree:
`from_env(SchedulerConfig, "scheduler")` reads PDMESH_SCHEDULER_<FIELD> for its own fields, and
every sub-config from the section named after its field, wherever it sits: `server` from
PDMESH_SERVER_*, `channel` from PDMESH_CHANNEL_*, `cache` from PDMESH_CACHE_*. Each value is
converted to the field's type; an error names the variable. Unset variables keep the defaults. A
variable of a section being loaded that names no field is refused, naming it (a misspelt or stale
setting must not be ignored silently). Nothing else calls os.environ.

The one sanctioned exception: OpenTelemetry's standard OTEL_* variables (exporter endpoint,
protocol, headers, sampler, resource attributes) are read by the OpenTelemetry SDK itself, as
every OpenTelemetry user expects. This module reads only whether an exporter is configured at all
(`otel_export`), so that with nothing set nothing is exported; services/telemetry hands the rest
to the SDK.

Field types understood: str, int, float, bool, Path, enum members (by name), `X | None` (an
empty value means None), tuple[str, ...] / tuple[int, ...] (comma-separated) and dataclasses
(a sub-config).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import InvalidRequest

PREFIX = "PDMESH_"
MiB = 1 << 20

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is malformed or inconsistent. `field` is the field, or the variable when the
    value came from the environment; the message is "<field>: <problem>; <fix>"."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class ServerConfig:
    """How a service's gRPC server listens, secures and stops. Loaded from PDMESH_SERVER_*."""

    host: str = "0.0.0.0"
    port: int = 50051  # 0 picks a free port (tests)
    # TLS: cert and key together turn TLS on; a CA as well requires and verifies client
    # certificates (mTLS).
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    tls_ca_path: Path | None = None
    # Draining on SIGTERM: in-flight calls get this long to finish before they are cancelled.
    shutdown_grace_s: float = 30.0
    max_message_bytes: int = 64 * MiB
    # Pings keep idle connections and long silent calls (a long prefill) alive through proxies.
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000
    # Clients may ping this often without the server treating it as abuse.
    keepalive_min_ping_interval_ms: int = 10_000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"is {self.port}; use 0 (any free port) to 65535")
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError(
                "tls_cert_path", "is set without tls_key_path or the reverse; set both to serve TLS"
            )
        if self.tls_ca_path is not None and self.tls_cert_path is None:
            raise ConfigError(
                "tls_ca_path",
                "verifying clients (mTLS) needs the server's own tls_cert_path and tls_key_path",
            )
        _check_positive(
            self, "shutdown_grace_s", "max_message_bytes", "keepalive_time_ms", "keepalive_timeout_ms"
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.tls_cert_path is not None


@dataclass(frozen=True)
class ChannelConfig:
    """How a client connects to a service: TLS files and the same limits as the servers'.

    Loaded from PDMESH_CHANNEL_*. TLS is on when tls_ca_path is set (the roots that verify the
    server); a cert and key as well present a client certificate (mTLS).
    """

    tls_ca_path: Path | None = None
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    # Overrides the name checked against the server's certificate (tests, IP-addressed peers).
    tls_server_name: str | None = None
    # A key sent with every call as gRPC metadata `authorization: Bearer KEY`: what a scheduler
    # with api_keys asks its clients for. Never logged.
    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_message_bytes: int = 64 * MiB
    keepalive_time_ms: int = 30_000
    keepalive_timeout_ms: int = 20_000

    def __post_init__(self) -> None:
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError(
                "tls_cert_path",
                "is set without tls_key_path or the reverse; set both to present a certificate",
            )
        if self.tls_cert_path is not None and self.tls_ca_path is None:
            raise ConfigError(
                "tls_ca_path", "is unset, but a client certificate is only sent over TLS; set the CA too"
            )
        _check_positive(self, "max_message_bytes", "keepalive_time_ms", "keepalive_timeout_ms")

    @property
    def tls(self) -> bool:
        return self.tls_ca_path is not None


@dataclass(frozen=True)
class HttpConfig:
    """The scheduler's OpenAI-compatible HTTP door (services/scheduler/openai_api). Loaded from
    PDMESH_HTTP_*. Its body limit and drain grace are the gRPC server's (ServerConfig)."""

    host: str | None = None  # None: the gRPC server's host
    port: int | None = 8000  # None (PDMESH_HTTP_PORT=""): no HTTP door; 0 picks a free port (tests)
    # Bearer keys a client must present (Authorization: Bearer KEY); empty: no authentication,
    # which suits a door on loopback only. Comma-separated in PDMESH_HTTP_API_KEYS.
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    # The deadline of a request that names none (x-request-timeout-ms); None: no deadline.
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError("port", f"is {self.port}; use 0 (any free port) to 65535, or empty for no HTTP door")
        if any(not key.strip() for key in self.api_keys):
            raise ConfigError("api_keys", "contains an empty key; list non-empty keys, comma-separated")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s", f"is {self.request_timeout_s}; use a positive value or empty")


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(name, f"is {value}; use a positive value")


def env_name(section: str, field: str) -> str:
    """The variable that sets `field` of `section`: env_name("server", "port") == "PDMESH_SERVER_PORT"."""
    return PREFIX + "_".join(p for p in (section, field) if p).upper()


def from_env(
    cls: type[T], section: str = "", environ: Mapping[str, str] | None = None, **overrides: Any
) -> T:
    """Build the dataclass tree `cls` from PDMESH_<SECTION>_<FIELD> variables.

    `overrides` (e.g. from command-line flags) win over the environment; fields set by neither
    keep their defaults. An override of a sub-config is a dataclass (used as it is) or a dict of
    overrides for it. Raises ConfigError naming the variable when a value does not convert, or
    when a variable of the section names no field.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    env = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    _check_known(cls, section, {f.name for f in fields if not _is_config(hints[f.name])}, env)
    values: dict[str, Any] = {}
    given = set(overrides)
    for f in fields:
        name, tp = env_name(section, f.name), hints[f.name]
        override = overrides.pop(f.name, None) if f.name in overrides else _UNSET
        if _is_config(tp) and not dataclasses.is_dataclass(override):
            values[f.name] = from_env(tp, f.name, env, **(override if isinstance(override, dict) else {}))
        elif override is not _UNSET:
            values[f.name] = override
        elif name in env:
            values[f.name] = _convert(env[name], tp, name)
    if overrides:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(overrides))}")
    try:
        return cls(**values)
    except (ConfigError, InvalidRequest) as e:
        if e.field in values and e.field not in given:
            raise ConfigError(env_name(section, e.field), e.problem) from None
        raise


_UNSET = object()


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_known(cls: type, section: str, names: set[str], env: Mapping[str, str]) -> None:
    if not section:
        return
    head = env_name(section, "") + "_"
    for variable in env:
        if variable.startswith(head) and variable[len(head) :].lower() not in names:
            others = ", ".join(f"{env_name(s, '')}_*" for s in _sections(cls))
            hint = f"; the rest are in {others}" if others else ""
            raise ConfigError(variable, f"is not a setting; {section} has {', '.join(sorted(names))}{hint}")


def _sections(cls: type) -> list[str]:
    """The sections of the sub-configs under `cls`, depth first."""
    hints = typing.get_type_hints(cls)
    found: list[str] = []
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            found += [f.name, *_sections(hints[f.name])]
    return found


def _convert(raw: str, tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{name}: unions other than `X | None` are not supported")
        return None if raw.strip() == "" else _convert(raw, inner[0], name)
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_convert(p.strip(), item, name) for p in raw.split(",") if p.strip())
    value = raw.strip()
    try:
        if tp is bool:
            return _BOOLS[value.lower()]
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp[value.upper()]
        if tp in (int, float, str, Path):
            return tp(value)
    except (KeyError, ValueError):
        raise ConfigError(name, f"is {raw!r}; expected {_describe(tp)}") from None
    raise TypeError(f"{name}: fields of type {tp!r} cannot be read from the environment")


_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _describe(tp: Any) -> str:
    if tp is bool:
        return "a boolean (1/0, true/false, yes/no, on/off)"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.name.lower() for m in tp)
    return {int: "an integer", float: "a number"}.get(tp, f"a {getattr(tp, '__name__', tp)}")


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


class PolicyName(enum.Enum):
    """The scheduler's placement policies (services/scheduler/policy.py)."""

    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    PREFIX_AWARE = "prefix_aware"
    SLO = "slo"  # services/scheduler/slo.py


@dataclass(frozen=True)
class SloConfig:
    """SLO defaults, the `slo` policy and the predictors behind it. Loaded from PDMESH_SLO_*."""

    # Targets of requests that bring none (0: no target). Every policy's bookings carry them; only
    # `slo` places by them.
    default_ttft_ms: float = 30_000.0
    default_tpot_ms: float = 0.0
    # The predictors' prior: a built-in profile's name (h100-llama-3.1-8b) or a profile JSON file
    # (`pdmesh bench profile` records one); None: the workers' own samples alone.
    profile: str | None = None
    candidates: int = 4  # least-loaded workers of each role forecast per request (beside prefix holders)
    overhead_ms: float = 0.0  # per request beyond its predicted steps and push (calls, hand-off)
    tie_fraction: float = 0.02  # plans within this share of the cheapest's cost are decided by prefix affinity
    retry_min_s: float = 0.05  # bounds of a refusal's retry hint
    retry_max_s: float = 60.0
    calibration_forget: float = 0.998  # per step sample: about the last 500 steps decide the fit
    calibration_prior_weight: float = 2.0  # the profile's weight, in pseudo-samples per shape
    # Forecasts are checked against targets as upper bounds: the share of admitted requests whose
    # measured TTFT / TPOT the bound should cover, learnt from the last `margin_window` outcomes
    # per worker (services/scheduler/margin.py).
    margin_quantile: float = 0.95
    margin_window: int = 64

    def __post_init__(self) -> None:
        _check_positive(self, "candidates", "retry_max_s", "calibration_forget", "margin_window")
        if not 0 < self.margin_quantile < 1:
            raise ConfigError("margin_quantile", f"is {self.margin_quantile}; use a share in (0, 1), e.g. 0.95")
        if self.default_ttft_ms < 0 or self.default_tpot_ms < 0 or self.overhead_ms < 0:
            raise ConfigError("default_ttft_ms", "targets and overheads cannot be negative; use 0 for none")
        if not 0 < self.calibration_forget <= 1:
            raise ConfigError("calibration_forget", f"is {self.calibration_forget}; use a value in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler service. Loaded from PDMESH_SCHEDULER_*."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    channel: ChannelConfig = dataclasses.field(default_factory=ChannelConfig)  # its calls to workers
    telemetry: TelemetryConfig = dataclasses.field(default_factory=TelemetryConfig)
    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)  # the OpenAI-compatible door
    slo: SloConfig = dataclasses.field(default_factory=SloConfig)
    model: str = "smollm2"  # the served model: its tokenizer, and the name clients may ask for
    policy: PolicyName = PolicyName.SLO
    # A prompt with at most this many uncached tokens is prefilled on its decode worker: a hand-off
    # costs more than computing a few tokens where they will be decoded.
    local_prefill_max_tokens: int = 32
    lease_ms: int = 10_000  # how long a decode worker holds an uncommitted reservation
    report_interval_ms: int = 500  # workers report load this often
    stale_after_ms: int = 3_000  # a worker silent this long leaves placement
    max_attempts: int = 3  # hand-off attempts per request (prefill failures), decode failovers
    # A request that finds every decode worker's KV cache full waits this long for blocks to free
    # (less with a TTFT target) before RESOURCE_EXHAUSTED.
    queue_timeout_ms: int = 30_000
    # Requests waiting for a decode slot (services/scheduler/admission.py); more: RESOURCE_EXHAUSTED.
    max_queued_requests: int = 1024
    # A prompt's text (or chat messages' contents) longer than this, in UTF-8 bytes, is refused
    # before it is tokenized (INVALID_ARGUMENT): tokenizing megabytes costs seconds of CPU.
    max_prompt_bytes: int = 1 * MiB
    # Bearer keys the Scheduler service asks of every call (gRPC metadata `authorization: Bearer
    # KEY`; comma-separated in PDMESH_SCHEDULER_API_KEYS); none: no authentication, which suits a
    # scheduler listening on loopback only. Workers' Registry calls are not asked (mTLS guards them).
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    def __post_init__(self) -> None:
        if any(not key.strip() for key in self.api_keys):
            raise ConfigError("api_keys", "contains an empty key; list non-empty keys, comma-separated")
        _check_positive(
            self, "lease_ms", "report_interval_ms", "stale_after_ms", "max_attempts", "queue_timeout_ms",
            "max_queued_requests", "max_prompt_bytes",
        )  # fmt: skip


def scheduler_api_keys(overrides: Mapping[str, str] = {}) -> tuple[str, ...]:  # noqa: B006 (never mutated)
    """The bearer keys a scheduler started with this environment (plus `overrides`, the extra
    settings `pdmesh up` gives its processes) asks for: PDMESH_SCHEDULER_API_KEYS."""
    name = env_name("scheduler", "api_keys")
    raw = overrides.get(name, os.environ.get(name, ""))
    return tuple(k.strip() for k in raw.split(",") if k.strip())
