"""Settings from PDMESH_* variables: conversions, precedence, and errors that name the variable."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvtransfer.config import ProgressMode
from pdmesh.cli import build_parser
from pdmesh.config import (
    ChannelConfig,
    ConfigError,
    DoorKeys,
    LogFormat,
    OtelExport,
    OtlpProtocol,
    SchedulerConfig,
    ServerConfig,
    TelemetryConfig,
    deprecated_settings,
    door_keys,
    env_name,
    from_env,
    otel_export,
)
from pdmesh.config.openmp import DEFAULT_SPINCOUNT, set_openmp_defaults
from services.kvstore.config import KVStoreConfig
from services.worker.config import WorkerConfig


class Policy(enum.Enum):
    ROUND_ROBIN = "round_robin"
    SLO = "slo"


@dataclass(frozen=True)
class ExampleConfig:
    name: str = "x"
    workers: int = 1
    ratio: float = 0.5
    verbose: bool = False
    model_path: Path | None = None
    ports: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    policy: Policy = Policy.SLO


def test_variable_names_are_prefix_section_and_field_in_upper_case() -> None:
    assert env_name("server", "port") == "PDMESH_SERVER_PORT"
    assert env_name("", "log_level") == "PDMESH_LOG_LEVEL"


def test_unset_variables_keep_the_defaults() -> None:
    assert from_env(ExampleConfig, "example", environ={}) == ExampleConfig()
    assert from_env(ServerConfig, "server", environ={"PDMESH_OTHER_PORT": "1"}) == ServerConfig()


def test_each_field_type_is_converted_from_its_variable() -> None:
    environ = {
        "PDMESH_EXAMPLE_NAME": "decode-0",
        "PDMESH_EXAMPLE_WORKERS": " 4 ",
        "PDMESH_EXAMPLE_RATIO": "1e-3",
        "PDMESH_EXAMPLE_VERBOSE": "yes",
        "PDMESH_EXAMPLE_MODEL_PATH": "/models/smollm2",
        "PDMESH_EXAMPLE_PORTS": "50051, 50052,",
        "PDMESH_EXAMPLE_TAGS": "a,b",
        "PDMESH_EXAMPLE_POLICY": "round_robin",
    }
    assert from_env(ExampleConfig, "example", environ=environ) == ExampleConfig(
        name="decode-0",
        workers=4,
        ratio=0.001,
        verbose=True,
        model_path=Path("/models/smollm2"),
        ports=(50051, 50052),
        tags=("a", "b"),
        policy=Policy.ROUND_ROBIN,
    )
    for text, value in [
        ("1", True),
        ("TRUE", True),
        ("on", True),
        ("0", False),
        ("off", False),
        ("No", False),
    ]:
        assert from_env(ExampleConfig, "example", environ={"PDMESH_EXAMPLE_VERBOSE": text}).verbose is value


def test_an_empty_value_of_an_optional_field_means_none() -> None:
    assert from_env(ExampleConfig, "example", environ={"PDMESH_EXAMPLE_MODEL_PATH": ""}).model_path is None


def test_overrides_win_over_the_environment() -> None:
    config = from_env(ServerConfig, "server", environ={"PDMESH_SERVER_PORT": "7000"}, port=0, host="127.0.0.1")
    assert (config.host, config.port, config.address) == ("127.0.0.1", 0, "127.0.0.1:0")
    with pytest.raises(TypeError, match="ServerConfig has no field.*prot"):
        from_env(ServerConfig, "server", environ={}, prot=1)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PDMESH_EXAMPLE_WORKERS", "four", "PDMESH_EXAMPLE_WORKERS: is 'four'; expected an integer"),
        ("PDMESH_EXAMPLE_RATIO", "half", "PDMESH_EXAMPLE_RATIO: is 'half'; expected a number"),
        (
            "PDMESH_EXAMPLE_VERBOSE",
            "maybe",
            "PDMESH_EXAMPLE_VERBOSE: is 'maybe'; expected a boolean (1/0, true",
        ),
        ("PDMESH_EXAMPLE_PORTS", "1,x", "PDMESH_EXAMPLE_PORTS: is 'x'; expected an integer"),
        (
            "PDMESH_EXAMPLE_POLICY",
            "fastest",
            "PDMESH_EXAMPLE_POLICY: is 'fastest'; expected one of round_robin, slo",
        ),
    ],
)
def test_a_value_that_does_not_convert_names_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_env(ExampleConfig, "example", environ={variable: value})
    assert str(error.value).startswith(message)
    assert error.value.field == variable


def test_an_inconsistent_setting_names_the_variable_or_the_field_it_came_from() -> None:
    with pytest.raises(ConfigError, match=r"^PDMESH_SERVER_PORT: is 70000; use 0 \(any free port\) to 65535$"):
        from_env(ServerConfig, "server", environ={"PDMESH_SERVER_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"^port: is 70000"):
        from_env(ServerConfig, "server", environ={}, port=70000)
    with pytest.raises(ConfigError, match=r"^PDMESH_SERVER_TLS_CERT_PATH: is set without tls_key_path"):
        from_env(ServerConfig, "server", environ={"PDMESH_SERVER_TLS_CERT_PATH": "/certs/server.pem"})
    with pytest.raises(ConfigError, match=r"^PDMESH_SERVER_MAX_MESSAGE_BYTES: is 0; use a positive value$"):
        from_env(ServerConfig, "server", environ={"PDMESH_SERVER_MAX_MESSAGE_BYTES": "0"})


def test_tls_settings_come_in_consistent_sets() -> None:
    assert not ServerConfig().tls and not ChannelConfig().tls
    assert ServerConfig(tls_cert_path=Path("c.pem"), tls_key_path=Path("k.pem")).tls
    with pytest.raises(ConfigError, match="^tls_ca_path: verifying clients"):
        ServerConfig(tls_ca_path=Path("ca.pem"))
    with pytest.raises(ConfigError, match="^tls_ca_path: is unset, but a client certificate"):
        ChannelConfig(tls_cert_path=Path("c.pem"), tls_key_path=Path("k.pem"))
    assert ChannelConfig(tls_ca_path=Path("ca.pem")).tls


def test_telemetry_settings_come_from_pdmesh_telemetry() -> None:
    env = {
        "PDMESH_TELEMETRY_LOG_LEVEL": "debug",
        "PDMESH_TELEMETRY_LOG_FORMAT": "json",
        "PDMESH_TELEMETRY_METRICS_PORT": "9400",
    }
    config = from_env(TelemetryConfig, "telemetry", env)
    assert (config.log_level, config.log_format, config.metrics_port) == ("debug", LogFormat.JSON, 9400)
    assert from_env(TelemetryConfig, "telemetry", {"PDMESH_TELEMETRY_METRICS_PORT": ""}).metrics_port is None
    with pytest.raises(ConfigError, match="PDMESH_TELEMETRY_LOG_LEVEL: is 'loud'; use one of debug, info"):
        from_env(TelemetryConfig, "telemetry", {"PDMESH_TELEMETRY_LOG_LEVEL": "loud"})


def test_nothing_is_exported_unless_an_otlp_endpoint_is_set() -> None:
    assert otel_export({}) == OtelExport()
    assert otel_export({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == OtelExport()
    everything = otel_export({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert everything == OtelExport(OtlpProtocol.GRPC, OtlpProtocol.GRPC)
    traces_over_http = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert otel_export(traces_over_http) == OtelExport(traces=OtlpProtocol.HTTP)
    assert otel_export({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_METRICS_EXPORTER": "none"}) == OtelExport(
        traces=OtlpProtocol.GRPC
    )
    assert otel_export({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}) == OtelExport()
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: is 'thrift'"):
        otel_export({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})


@dataclass(frozen=True)
class Inner:
    size: int = 1


@dataclass(frozen=True)
class Tree:
    name: str = "root"
    server: ServerConfig = ServerConfig()
    inner: Inner = Inner()


def test_a_tree_loads_each_sub_config_from_its_own_section_and_takes_dict_overrides() -> None:
    environ = {"PDMESH_TREE_NAME": "t", "PDMESH_SERVER_PORT": "7000", "PDMESH_INNER_SIZE": "3"}
    assert from_env(Tree, "tree", environ=environ) == Tree("t", ServerConfig(port=7000), Inner(3))
    overridden = from_env(Tree, "tree", environ=environ, server={"host": "127.0.0.1"}, inner=Inner(9))
    assert overridden == Tree("t", ServerConfig(host="127.0.0.1", port=7000), Inner(9))


def test_a_variable_that_names_no_setting_of_its_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^PDMESH_INNER_SIZ: is not a setting; inner has size$"):
        from_env(Tree, "tree", environ={"PDMESH_INNER_SIZ": "3"})
    with pytest.raises(ConfigError, match=r"^PDMESH_WORKER_MODEL: is not a setting"):
        from_env(WorkerConfig, "worker", environ={"PDMESH_WORKER_MODEL": "smollm2"})
    assert from_env(WorkerConfig, "worker", environ={"PDMESH_ENGINE_MODEL": "/m"}).engine.model == "/m"


def test_a_worker_hands_its_kv_settings_to_its_transport() -> None:
    environ = {"PDMESH_WORKER_KV_PROGRESS": "thread_polling", "PDMESH_WORKER_KV_MESSAGE_BYTES": "536870912"}
    transport = from_env(WorkerConfig, "worker", environ=environ).transport()
    assert (transport.progress, transport.message_bytes) == (ProgressMode.THREAD_POLLING, 512 << 20)
    with pytest.raises(ConfigError, match=r"^PDMESH_WORKER_KV_PROGRESS: is 'spin'; expected one of"):
        from_env(WorkerConfig, "worker", environ={"PDMESH_WORKER_KV_PROGRESS": "spin"})
    with pytest.raises(ConfigError, match=r"^PDMESH_WORKER_KV_MESSAGE_BYTES: is 0; use a positive number of bytes"):
        from_env(WorkerConfig, "worker", environ={"PDMESH_WORKER_KV_MESSAGE_BYTES": "0"})


def test_only_a_cpu_workers_transport_keeps_its_torch_ops_on_one_thread() -> None:
    """A CPU worker's step thread keeps the process's only OpenMP pool; a GPU worker's transport
    and the KV store's keep torch's thread count for their host copies."""
    assert from_env(WorkerConfig, "worker", environ={}).transport().one_torch_thread
    cuda = from_env(WorkerConfig, "worker", environ={"PDMESH_ENGINE_DEVICE": "cuda:0"})
    assert not cuda.transport().one_torch_thread
    assert not from_env(KVStoreConfig, "kvstore", environ={}).transport().one_torch_thread


def test_direct_kv_writes_are_on_by_default_and_one_setting_turns_them_off() -> None:
    assert from_env(WorkerConfig, "worker", environ={}).transport().direct_writes
    off = from_env(WorkerConfig, "worker", environ={"PDMESH_WORKER_KV_DIRECT_WRITES": "off"}).transport()
    assert not off.direct_writes


def test_a_worker_streams_every_token_unless_a_stream_interval_is_set_and_refuses_one_below_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert from_env(WorkerConfig, "worker", environ={}).stream_interval == 1
    assert from_env(WorkerConfig, "worker", environ={"PDMESH_WORKER_STREAM_INTERVAL": "4"}).stream_interval == 4
    assert from_env(WorkerConfig, "worker", environ={}, stream_interval=8).stream_interval == 8  # --stream-interval
    fix = r"use 1 \(every token\) or more tokens$"
    with pytest.raises(ConfigError, match=rf"^PDMESH_WORKER_STREAM_INTERVAL: is 0; {fix}"):
        from_env(WorkerConfig, "worker", environ={"PDMESH_WORKER_STREAM_INTERVAL": "0"})
    with pytest.raises(ConfigError, match=rf"^stream_interval: is -2; {fix}"):
        from_env(WorkerConfig, "worker", environ={}, stream_interval=-2)
    for command in (["up"], ["serve", "decode"]):  # refused before anything starts
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--stream-interval", "0"])
        assert "argument --stream-interval: is '0'; use a whole number of tokens, 1 (every token) or more" in (
            capsys.readouterr().err
        )
    assert build_parser().parse_args(["up", "--stream-interval", "4"]).stream_interval == 4


def test_one_setting_guards_both_doors_and_the_old_per_door_names_still_guard_their_own() -> None:
    both = from_env(SchedulerConfig, "scheduler", environ={"PDMESH_API_KEYS": "k1,k2"})
    assert both.door_keys == DoorKeys(grpc=("k1", "k2"), http=("k1", "k2"))
    assert deprecated_settings(SchedulerConfig, "scheduler", {"PDMESH_API_KEYS": "k1,k2"}) == []

    # The names from before PDMESH_API_KEYS keep what they did (a door each), named for a warning.
    old = {"PDMESH_SCHEDULER_API_KEYS": "g1", "PDMESH_HTTP_API_KEYS": "h1", "PDMESH_API_KEYS": "k1"}
    assert from_env(SchedulerConfig, "scheduler", environ=old).door_keys == DoorKeys(("k1", "g1"), ("k1", "h1"))
    assert door_keys(old) == DoorKeys(("k1", "g1"), ("k1", "h1"))  # what `pdmesh up` reads for its own calls
    assert sorted(deprecated_settings(SchedulerConfig, "scheduler", old)) == [
        ("PDMESH_HTTP_API_KEYS", "PDMESH_API_KEYS"), ("PDMESH_SCHEDULER_API_KEYS", "PDMESH_API_KEYS"),
    ]  # fmt: skip
    # Compose passes unset ones through as empty: no keys, nothing deprecated in use.
    empty = {"PDMESH_HTTP_API_KEYS": "", "PDMESH_API_KEYS": ""}
    assert from_env(SchedulerConfig, "scheduler", environ=empty).door_keys == DoorKeys((), ())
    assert deprecated_settings(SchedulerConfig, "scheduler", empty) == []
    with pytest.raises(ConfigError, match="^PDMESH_SCHEDULER_GRPC_API_KEYS: is not a setting; scheduler has api_keys"):
        from_env(SchedulerConfig, "scheduler", environ={"PDMESH_SCHEDULER_GRPC_API_KEYS": "g1"})


def test_openmp_spin_default_is_set_before_torch_and_a_given_one_kept() -> None:
    environ: dict[str, str] = {}
    set_openmp_defaults(environ)
    assert environ == {"GOMP_SPINCOUNT": str(DEFAULT_SPINCOUNT)}
    given = {"GOMP_SPINCOUNT": "300000"}
    set_openmp_defaults(given)
    assert given == {"GOMP_SPINCOUNT": "300000"}
