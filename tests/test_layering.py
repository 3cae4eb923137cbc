"""The layering DESIGN §1 promises: the core is transport-free.

engine/ and kernels/ import no grpc, protobuf or ucxx; importing every module of theirs in a fresh
interpreter must leave those packages unloaded.
"""

from __future__ import annotations

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
