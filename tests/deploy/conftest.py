"""The compose test builds images and runs containers for minutes (and may start dockerd): it runs
only when asked for by marker, as `make compose-test` does (`pytest -m compose`), never as part of
a plain `pytest` or `make test`."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "compose" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="runs the mesh under a container engine for minutes: make compose-test")
    for item in items:
        if item.get_closest_marker("compose") is not None:
            item.add_marker(skip)
