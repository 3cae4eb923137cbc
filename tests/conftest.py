"""Options of the test suite itself."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-requests", type=int, default=400,
        help="requests the soak test (tests/mesh/test_soak.py) sends; `make soak` sends 10,000",
    )  # fmt: skip
