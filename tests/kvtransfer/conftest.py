"""Peers for the transfer tests run as real processes; UCX speaks tcp between them on loopback."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _quiet_ucx() -> None:
    # UCX warns about ucxx's own UCX_MEMTYPE_CACHE setting; spawned peers inherit this environment.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
