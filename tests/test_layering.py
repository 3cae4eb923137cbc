"""The layering DESIGN §1 promises: the core is transport-free.

engine/ and kernels/ import no grpc, protobuf or ucxx; importing every module of theirs in a fresh
interpreter must leave those packages unloaded. Protobuf types stop at the wire ends of each
package (convert, servicer, server and client modules). The client library needs no torch.
The scheduler's own test (tests/services/scheduler/test_scheduler_layering.py) proves it loads no
torch.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("grpc", "google.protobuf", "ucxx", "ucp", "kvtransfer", "services", "pdmesh")


def modules_of(package: str) -> list[str]:
    found = pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")
    return [package] + [m.name for m in found if "._" not in m.name or m.name.endswith("__main__")]


def test_engine_and_kernels_import_no_transport() -> None:
    mods = modules_of("engine") + modules_of("kernels")
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert bad == [], f"engine/kernels pulled in {bad[:10]}"
    assert {"engine.engine", "engine.weights.gguf_file", "kernels.paged_attention"} <= set(loaded)


# Modules allowed to touch protobuf: the wire ends of each package. convert* turn messages into
# the package's own types and back; servicer and server face inbound calls; *client make outbound
# calls; bootstrap is the server plumbing every service shares.
PROTOBUF = ("pdmesh.v1", "google.protobuf", "google.rpc", "grpc_health", "grpc_reflection", "grpc_status")
WIRE_ENDS = ("convert", "servicer", "server", "client", "bootstrap")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_protobuf_is_imported_only_by_convert_servicer_server_and_client_modules() -> None:
    offenders = []
    for package in ("services", "pdmesh", "kvtransfer", "engine", "kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" in path.relative_to(ROOT).parts or path.stem.startswith(WIRE_ENDS) or path.stem.endswith(WIRE_ENDS):
                continue
            wire = sorted(m for m in imported_modules(path) if m.startswith(PROTOBUF))
            if wire:
                offenders.append(f"{path.relative_to(ROOT)}: {wire[0]}")
    assert offenders == []


def test_the_client_library_imports_no_torch() -> None:
    code = "import json, sys, pdmesh.client; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if m.split(".")[0] in ("torch", "triton", "ucxx", "kvtransfer")] == []
