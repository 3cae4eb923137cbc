"""One compose project under test: bring it up, watch every service's health, kill one, take it down.

Everything is found through compose's labels (`com.docker.compose.project`/`.service`), which
docker-compose v1 and `docker compose` v2 both set, so the checks cover whatever services the
file defines: a service added later is waited for and checked without changing the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.container_engine import ContainerEngine, compose_command

_POLL_S = 2.0


class ServiceFailed(AssertionError):
    """A service exited, restarted or turned unhealthy where it should not; carries its log tail."""


@dataclass
class ComposeProject:
    engine: ContainerEngine
    file: Path
    name: str
    variables: dict[str, str] = field(default_factory=dict)  # compose's ${...} substitutions

    def compose(self, *args: str, timeout_s: float = 600.0) -> str:
        argv = [*compose_command(self.engine), "--project-name", self.name, "--file", str(self.file), *args]
        env = {**self.engine.env, **self.variables}
        return ContainerEngine(env).run(*argv, timeout_s=timeout_s)

    def config(self) -> dict[str, Any]:
        """The file as compose renders it with `variables`."""
        rendered: dict[str, Any] = yaml.safe_load(self.compose("config"))
        return rendered

    def default_services(self) -> set[str]:
        """The services `up` starts without --profile (the observability ones need a profile)."""
        return {name for name, service in self.config()["services"].items() if not service.get("profiles")}

    def containers(self) -> list[dict[str, Any]]:
        """`docker inspect` of every container of the project."""
        ids = self._labelled("ps", "--all", "--quiet")
        found: list[dict[str, Any]] = json.loads(self.engine.docker("inspect", *ids)) if ids else []
        return found

    def container(self, service: str) -> dict[str, Any]:
        """The (first) container of `service`."""
        return next(c for c in self.containers() if service_of(c) == service)

    def wait_healthy(self, timeout_s: float) -> list[dict[str, Any]]:
        """Until every service of the file runs containers that their health checks call healthy.

        Fails at once when a container exits or a health check fails for good, with its log.
        """
        wanted = self.default_services()
        deadline = time.monotonic() + timeout_s
        while True:
            containers = self.containers()
            for c in containers:
                self._check_alive(c)
            missing = wanted - {service_of(c) for c in containers}
            if not missing and all(c["State"]["Health"]["Status"] == "healthy" for c in containers):
                return containers
            if time.monotonic() > deadline:
                states = {c["Name"]: c["State"]["Health"]["Status"] for c in containers}
                raise ServiceFailed(f"not healthy within {timeout_s:.0f} s: {states}; no container for {missing}")
            time.sleep(_POLL_S)

    def kill(self, service: str) -> int:
        """SIGKILL the service's container from outside, as a crash or the OOM killer would: unlike
        `docker kill`, which marks the container stopped on purpose, this leaves its restart policy
        in force. Returns the container's restart count before the kill."""
        c = self.container(service)
        os.kill(c["State"]["Pid"], signal.SIGKILL)  # its init; the PID namespace dies with it
        return int(c["RestartCount"])

    def wait_restarted(self, service: str, restarts_before: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while int(self.container(service)["RestartCount"]) <= restarts_before:
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{service} was not restarted within {timeout_s:.0f} s")
            time.sleep(0.5)

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "30")

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of this project that still exist."""
        left = [f"container {c}" for c in self._labelled("ps", "--all", "--quiet")]
        left += [f"network {n}" for n in self._labelled("network", "ls", "--quiet")]
        left += [f"volume {v}" for v in self._labelled("volume", "ls", "--quiet")]
        return left

    def logs(self, container_id: str, lines: int = 40) -> str:
        argv = ["docker", "logs", "--tail", str(lines), container_id]
        done = subprocess.run(argv, env=self.engine.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return done.stdout

    def _labelled(self, *command: str) -> list[str]:
        out = self.engine.docker(*command, "--filter", f"label=com.docker.compose.project={self.name}")
        return out.split()

    def _check_alive(self, c: dict[str, Any]) -> None:
        state = c["State"]
        health = state.get("Health")
        problem = None
        if health is None:
            problem = "has no health check: give it one (docker-compose files, x-service)"
        elif state["Status"] != "running":
            problem = f"is {state['Status']} (exit code {state['ExitCode']})"
        elif health["Status"] == "unhealthy":
            problem = f"is unhealthy: {health['Log'][-1]['Output'].strip() if health['Log'] else '?'}"
        if problem is not None:
            raise ServiceFailed(f"{c['Name'].lstrip('/')} {problem}\n--- its log ---\n{self.logs(c['Id'])}")


def service_of(container: dict[str, Any]) -> str:
    return str(container["Config"]["Labels"]["com.docker.compose.service"])
