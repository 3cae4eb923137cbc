"""The two compose files describe one mesh: the GPU file (docker-compose.yml) cannot run here, so
it is held to the CPU file, which `make compose-test` runs for real.

Both must have the same services, each with a health check (the compose test waits for every
service's), an init and a restart policy; the same commands apart from the device; the same build
arguments, each one the Dockerfile declares. The observability services (upstream images: the
collector, Jaeger, Prometheus, Grafana) stay under the "observability" profile, which the compose
test does not start (no image registry is reachable where it runs), identical in both files;
their config files exist, and Prometheus scrapes every pdmesh service's /metrics port.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = {"gpu": ROOT / "docker-compose.yml", "cpu": ROOT / "docker-compose.cpu.yml"}
DEVICE_FLAGS = {"--device", "--threads"}  # flags that may differ between the files, with their value


def all_services(kind: str) -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(FILES[kind].read_text())
    return loaded["services"]


def services(kind: str) -> dict[str, dict[str, Any]]:
    """The pdmesh services: built from the Dockerfile, started by default."""
    return {name: s for name, s in all_services(kind).items() if "profiles" not in s}


def observability(kind: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in all_services(kind).items() if "profiles" in s}


def without_device_flags(command: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
        elif arg in DEVICE_FLAGS:
            skip = True
        else:
            kept.append(arg)
    return kept


def test_both_files_run_the_same_services() -> None:
    assert services("gpu").keys() == services("cpu").keys()


@pytest.mark.parametrize("kind", FILES)
def test_every_service_is_health_checked_restarted_and_runs_under_an_init(kind: str) -> None:
    for name, service in services(kind).items():
        assert service.get("healthcheck", {}).get("test"), f"{kind}: {name} has no health check"
        assert service.get("init") is True, f"{kind}: {name} has no init"
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), f"{kind}: {name} is not restarted"


def test_commands_differ_only_in_the_device() -> None:
    gpu, cpu = services("gpu"), services("cpu")
    for name in gpu:
        assert without_device_flags(gpu[name]["command"]) == without_device_flags(cpu[name]["command"]), name
        assert gpu[name].get("ports") == cpu[name].get("ports"), name
        assert gpu[name].get("depends_on") == cpu[name].get("depends_on"), name


def test_gpu_workers_reserve_a_gpu() -> None:
    for name, service in services("gpu").items():
        if "cuda" in service["command"]:
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"], name


def test_build_arguments_are_the_dockerfiles() -> None:
    declared = set(re.findall(r"^ARG (\w+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.MULTILINE))
    for kind in FILES:
        for name, service in services(kind).items():
            assert set(service["build"]["args"]) <= declared, f"{kind}: {name}"
            assert service["build"]["dockerfile"] == "deploy/Dockerfile"


def test_the_observability_services_are_one_opt_in_profile_alike_in_both_files() -> None:
    gpu, cpu = observability("gpu"), observability("cpu")
    assert set(gpu) == {"otel-collector", "jaeger", "prometheus", "grafana"}
    assert gpu == cpu
    for name, service in gpu.items():
        assert service["profiles"] == ["observability"], name
        assert service.get("init") is True and service.get("restart") == "unless-stopped", name
        for volume in service.get("volumes", []):
            assert (ROOT / volume.split(":")[0]).exists(), f"{name}: {volume}"


@pytest.mark.parametrize("kind", FILES)
def test_every_pdmesh_service_serves_metrics_that_prometheus_scrapes(kind: str) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (pdmesh,) = [job for job in config["scrape_configs"] if job["job_name"] == "pdmesh"]
    targets = {t for group in pdmesh["static_configs"] for t in group["targets"]}
    for name, service in services(kind).items():
        port = service["environment"]["PDMESH_TELEMETRY_METRICS_PORT"]
        assert f"{name}:{port}" in targets, f"{kind}: Prometheus does not scrape {name}"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in service["environment"], f"{kind}: {name}"
