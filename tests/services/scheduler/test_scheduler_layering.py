"""The scheduler's image needs no CUDA stack: importing its server, and every module of its
package, in a fresh interpreter leaves torch unloaded (DESIGN §1)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_scheduler_service_imports_no_torch() -> None:
    found = pkgutil.walk_packages([str(ROOT / "services" / "scheduler")], prefix="services.scheduler.")
    modules = ["services.scheduler.server", *sorted(m.name for m in found)]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))

    assert "services.scheduler.server" in loaded and "engine.tokenizer" in loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("torch", "triton", "ucxx", "kvtransfer"))
    assert heavy == [], f"the scheduler pulled in {heavy[:10]}"
