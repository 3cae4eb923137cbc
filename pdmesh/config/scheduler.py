"""The scheduler's settings: SchedulerConfig (PDMESH_SCHEDULER_*) with its HTTP door (HttpConfig,
PDMESH_HTTP_*) and SLO policy (SloConfig, PDMESH_SLO_*) beside the shared server, channel and
telemetry sections."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from pdmesh.config.env import ConfigError, MiB, check_positive, read_variable, setting
from pdmesh.config.telemetry import TelemetryConfig
from pdmesh.config.transport import ChannelConfig, ServerConfig

API_KEYS = "PDMESH_API_KEYS"  # the bearer keys of both doors
_GRPC_API_KEYS, _HTTP_API_KEYS = "PDMESH_SCHEDULER_API_KEYS", "PDMESH_HTTP_API_KEYS"  # deprecated: one door's


@dataclass(frozen=True)
class DoorKeys:
    """The bearer keys each door of the scheduler accepts (Authorization: Bearer KEY, as gRPC
    metadata or an HTTP header); an empty tuple: that door asks for none."""

    grpc: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    http: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    @classmethod
    def of(cls, shared: tuple[str, ...], grpc_only: tuple[str, ...], http_only: tuple[str, ...]) -> DoorKeys:
        return cls(_union(shared, grpc_only), _union(shared, http_only))


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a + b))


def _check_keys(config: object, name: str) -> None:
    if any(not key.strip() for key in getattr(config, name)):
        raise ConfigError(name, "contains an empty key; list non-empty keys, comma-separated")


@dataclass(frozen=True)
class HttpConfig:
    """The scheduler's OpenAI-compatible HTTP door (services/scheduler/openai_api). Loaded from
    PDMESH_HTTP_*. Its body limit and drain grace are the gRPC server's (ServerConfig)."""

    host: str | None = None  # None: the gRPC server's host
    port: int | None = 8000  # None (PDMESH_HTTP_PORT=""): no HTTP door; 0 picks a free port (tests)
    # Deprecated (PDMESH_HTTP_API_KEYS): keys this door alone accepts beside SchedulerConfig.api_keys.
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False, metadata=setting(replaced_by=API_KEYS))
    # The deadline of a request that names none (x-request-timeout-ms); None: no deadline.
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError("port", f"is {self.port}; use 0 (any free port) to 65535, or empty for no HTTP door")
        _check_keys(self, "api_keys")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s", f"is {self.request_timeout_s}; use a positive value or empty")


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
    # slo: what one millisecond of a request's wait for its first token, beyond its soonest plan's,
    # costs against a millisecond of compute (0: the cheapest compute wins, however long its queue;
    # services/scheduler/slo.py says why 0.5).
    wait_weight: float = 0.5
    retry_min_s: float = 0.05  # bounds of a refusal's retry hint
    retry_max_s: float = 60.0
    calibration_forget: float = 0.998  # per step sample: about the last 500 steps decide the fit
    calibration_prior_weight: float = 2.0  # the profile's weight, in pseudo-samples per shape
    # Forecasts are checked against targets as upper bounds: the share of admitted requests whose
    # measured TTFT / TPOT the bound should cover, learnt from the last `margin_window` outcomes
    # per worker of the last `margin_horizon_s` (services/scheduler/margin.py).
    margin_quantile: float = 0.95
    margin_window: int = 64
    margin_horizon_s: float = 30.0

    def __post_init__(self) -> None:
        check_positive(self, "candidates", "retry_max_s", "calibration_forget", "margin_window", "margin_horizon_s")
        if not 0 < self.margin_quantile < 1:
            raise ConfigError("margin_quantile", f"is {self.margin_quantile}; use a share in (0, 1), e.g. 0.95")
        if self.wait_weight < 0:
            raise ConfigError("wait_weight", f"is {self.wait_weight}; use 0 (compute alone) or more, e.g. 0.5")
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
    # Bearer keys both doors ask of every call: the Scheduler service (gRPC metadata `authorization:
    # Bearer KEY`) and the OpenAI HTTP door (the Authorization header). Comma-separated in
    # PDMESH_API_KEYS; none: no authentication, which suits a scheduler on loopback only. Workers'
    # Registry calls and health are not asked (mTLS guards them).
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False, metadata=setting(API_KEYS))
    # Deprecated (PDMESH_SCHEDULER_API_KEYS): keys the gRPC door alone accepts beside api_keys.
    grpc_api_keys: tuple[str, ...] = dataclasses.field(
        default=(), repr=False, metadata=setting(_GRPC_API_KEYS, replaced_by=API_KEYS)
    )

    def __post_init__(self) -> None:
        _check_keys(self, "api_keys")
        _check_keys(self, "grpc_api_keys")
        check_positive(
            self, "lease_ms", "report_interval_ms", "stale_after_ms", "max_attempts", "queue_timeout_ms",
            "max_queued_requests", "max_prompt_bytes",
        )  # fmt: skip


    @property
    def door_keys(self) -> DoorKeys:
        return DoorKeys.of(self.api_keys, self.grpc_api_keys, self.http.api_keys)


def door_keys(extra: Mapping[str, str] = {}) -> DoorKeys:  # noqa: B006 (never mutated)
    """The keys a scheduler started with this environment plus `extra` (the settings `pdmesh up`
    gives its processes) will ask for at each door."""
    keys = [read_variable(name, tuple[str, ...], extra) or () for name in (API_KEYS, _GRPC_API_KEYS, _HTTP_API_KEYS)]
    return DoorKeys.of(*keys)
