"""A container engine for the compose test: the one already answering, or a dockerd started here.

On a machine where Docker is installed but not running (Debian's docker.io on these build
machines), the test starts dockerd itself, as root, in the background, with its own socket and
data root, and stops it afterwards. An engine that already answers is used and left running. The
data root is kept between runs, so base images and build layers are cached.

Also here: which client builds with BuildKit (the Dockerfile mounts a secret and a wheel folder)
and which compose command exists, since both differ between Docker releases.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

STATE_DIR = Path("/var/lib/pdmesh-compose")  # data root: images and layer cache, kept between runs
RUN_DIR = Path("/run/pdmesh-compose")  # socket, pid file, exec root of the dockerd started here
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0


class EngineError(RuntimeError):
    """No container engine could be found or started; the message says what to install or fix."""


@dataclass
class ContainerEngine:
    """Where docker commands go (`env` carries DOCKER_HOST) and the dockerd started here, if any."""

    env: dict[str, str]
    daemon: subprocess.Popen[bytes] | None = None

    def run(self, *argv: str, timeout_s: float = 120.0, check: bool = True) -> str:
        """Run a command against this engine and return its stdout; raise with its stderr if it fails."""
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done.stdout

    def stream(self, argv: Sequence[str], timeout_s: float, extra_env: dict[str, str] | None = None) -> None:
        """Run a long command (a build) with its output going to this process's stdout/stderr."""
        subprocess.run(argv, env={**self.env, **(extra_env or {})}, check=True, timeout=timeout_s)

    def succeeds(self, *argv: str, timeout_s: float = 60.0) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired, FileNotFoundError):
            return subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout_s).returncode == 0
        return False

    def docker(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> str:
        return self.run("docker", *args, timeout_s=timeout_s, check=check)

    def responds(self) -> bool:
        return self.succeeds("docker", "info", timeout_s=20)

    def image_exists(self, image: str) -> bool:
        return self.succeeds("docker", "image", "inspect", image)


@contextlib.contextmanager
def container_engine() -> Iterator[ContainerEngine]:
    """The running engine, or a dockerd started for the duration of the `with` block."""
    for env in (dict(os.environ), {**os.environ, "DOCKER_HOST": f"unix://{RUN_DIR / 'docker.sock'}"}):
        engine = ContainerEngine(env)
        if engine.responds():
            yield engine
            return
    engine = _start_dockerd(env)
    try:
        yield engine
    finally:
        _stop_dockerd(engine)


def _start_dockerd(env: dict[str, str]) -> ContainerEngine:
    for tool in ("docker", "dockerd"):
        if shutil.which(tool) is None:
            raise EngineError(f"no `{tool}` and no engine running: install Docker (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        raise EngineError("no container engine is running, and starting dockerd needs root: start one, then retry")
    (STATE_DIR / "docker").mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    log = (STATE_DIR / "dockerd.log").open("ab")
    argv = [
        "dockerd", "--data-root", str(STATE_DIR / "docker"), "--exec-root", str(RUN_DIR / "exec"),
        "--pidfile", str(RUN_DIR / "dockerd.pid"), "--host", env["DOCKER_HOST"],
    ]  # fmt: skip
    daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    engine = ContainerEngine(env, daemon)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not engine.responds():
        if daemon.poll() is not None or time.monotonic() > deadline:
            _stop_dockerd(engine)
            raise EngineError(f"dockerd did not start; its log: {STATE_DIR / 'dockerd.log'}")
        time.sleep(0.5)
    return engine


def _stop_dockerd(engine: ContainerEngine) -> None:
    """SIGTERM (dockerd stops its containers and its containerd), SIGKILL if it outstays the grace."""
    daemon = engine.daemon
    if daemon is None or daemon.poll() is not None:
        return
    daemon.terminate()
    try:
        daemon.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


def build_command(engine: ContainerEngine) -> tuple[list[str], dict[str, str]]:
    """A `docker build` that uses BuildKit, and the environment it needs.

    Docker 23+ builds with BuildKit through the buildx plugin; a client without the plugin refuses
    DOCKER_BUILDKIT=1. Clients before 23 (Debian's docker.io) have BuildKit built in. So: the
    first `docker` on PATH that has buildx or predates 23.
    """
    for client in _docker_clients():
        if engine.succeeds(client, "buildx", "version"):
            return [client, "buildx", "build", "--load"], {}
        version = engine.run(client, "version", "--format", "{{.Client.Version}}", check=False).strip()
        if version and int(version.split(".")[0]) < 23:
            return [client, "build"], {"DOCKER_BUILDKIT": "1"}
    raise EngineError("no docker client builds with BuildKit: install the buildx plugin (docker-buildx)")


def compose_command(engine: ContainerEngine) -> list[str]:
    """`docker compose` (v2, the plugin) where it exists, else `docker-compose` (v1)."""
    if engine.succeeds("docker", "compose", "version"):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise EngineError("no compose: install the compose plugin, or docker-compose (apt-get install docker-compose)")


def _docker_clients() -> list[str]:
    """Every distinct `docker` executable on PATH, in PATH order."""
    found: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / "docker"
        if path.is_file() and os.access(path, os.X_OK) and str(path.resolve()) not in found:
            found.append(str(path.resolve()))
    return found
