"""Build the images a compose file names, the way the machine at hand allows.

The compose file's own build arguments are used, with three substitutions where the defaults
cannot work here — each a compose variable, so the rendered file stays the one source of truth:
- the base image (python:3.11-slim) can be neither found nor pulled (no registry reachable):
  a local stand-in is built with debootstrap — Debian bookworm with its Python 3.11 and venv —
  and imported, once (PDMESH_BASE_IMAGE);
- pip finds the wanted torch wheel without an index (a local wheel folder, as on these machines):
  it is copied into the build context and installed from there (PDMESH_TORCH, and no
  PDMESH_TORCH_INDEX_URL);
- HTTPS may pass through a TLS-intercepting proxy: the host's CA bundle goes to the build as the
  `pip-ca` secret, which only the pip steps see and the image never keeps.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import parse_wheel_filename

from tests.deploy.container_engine import STATE_DIR, ContainerEngine, build_command

LOCAL_BASE = "localhost/pdmesh-base:bookworm-python3.11"
DEBIAN_MIRROR = "http://deb.debian.org/debian"  # plain http: apt checks signatures, no CA needed
IMAGE_PYTHON = "3.11"  # the Python of both python:3.11-slim and bookworm: what the torch wheel must fit
IMAGE_LABEL = "org.opencontainers.image.title=pdmesh"  # set by deploy/Dockerfile
_BUILD_TIMEOUT_S = 1800.0


def base_image(engine: ContainerEngine, wanted: str) -> str:
    """`wanted` if it is here or can be pulled; otherwise the local Debian stand-in, built once."""
    if engine.image_exists(wanted) or engine.succeeds("docker", "pull", wanted, timeout_s=600):
        return wanted
    if not engine.image_exists(LOCAL_BASE):
        build_local_base(engine)
    return LOCAL_BASE


def build_local_base(engine: ContainerEngine) -> None:
    """Debian bookworm (minbase) with python3 and python3-venv, imported as LOCAL_BASE (~170 MB)."""
    if shutil.which("debootstrap") is None:
        raise RuntimeError("no base image can be pulled and debootstrap is missing: apt-get install debootstrap")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=STATE_DIR))
    try:
        packages = "--include=python3,python3-venv"
        engine.stream(
            ["debootstrap", "--variant=minbase", packages, "bookworm", str(root), DEBIAN_MIRROR], timeout_s=900
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", LOCAL_BASE],
            stdin=tar.stdout, env=engine.env, check=True, timeout=600,
        )  # fmt: skip
        if tar.wait() != 0:
            raise RuntimeError(f"tar of {root} failed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def local_torch(requirement: str, wheels: Path) -> Path | None:
    """Copy the wheel pip finds for `requirement` without any index (its find-links) into `wheels`.

    None when `requirement` already names a file, or pip finds no such wheel offline.
    """
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return None  # a wheel path, used as given
    argv = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-index", "--only-binary=:all:",
        "--python-version", IMAGE_PYTHON, "--dest", str(wheels), requirement,
    ]  # fmt: skip
    if subprocess.run(argv, capture_output=True, timeout=300).returncode != 0:
        return None
    for wheel in sorted(wheels.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name == req.name and req.specifier.contains(version, prereleases=True):
            return wheel
    return None


def build_images(engine: ContainerEngine, config: dict[str, Any]) -> None:
    """Build every image that a service of the rendered compose `config` builds, each once."""
    builder, builder_env = build_command(engine)
    secret = _ca_bundle()
    built: set[str] = set()
    for service in config["services"].values():
        build, image = service.get("build"), service.get("image")
        if build is None or image in built:
            continue
        context = Path(build["context"])
        argv = [*builder, "--progress=plain", "--file", str(context / build.get("dockerfile", "Dockerfile"))]
        argv += ["--tag", image] if image else []
        for key, value in (build.get("args") or {}).items():
            argv += ["--build-arg", f"{key}={'' if value is None else value}"]
        argv += ["--secret", f"id=pip-ca,src={secret}"] if secret else []
        engine.stream([*argv, str(context)], timeout_s=_BUILD_TIMEOUT_S, extra_env=builder_env)
        built.add(image)
    # Each rebuild leaves the image it replaced untagged; remove those (ours only), keep the cache.
    engine.docker("image", "prune", "--force", "--filter", f"label={IMAGE_LABEL}")


def _ca_bundle() -> Path | None:
    """The CA bundle this host's Python trusts (SSL_CERT_FILE or OpenSSL's default)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).resolve()
    return None
