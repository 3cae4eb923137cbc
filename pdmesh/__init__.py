"""pdmesh: prefill and decode disaggregated LLM serving."""

from __future__ import annotations

import importlib.metadata


def _version() -> str:
    # Run from a source tree without `pip install` (PYTHONPATH, as on the GPU machine), the
    # package has no metadata; the workers still register, saying so instead of crashing.
    try:
        return importlib.metadata.version("pdmesh")
    except importlib.metadata.PackageNotFoundError:
        return "0+source"


__version__ = _version()
