"""Fixtures of the scheduler tests: a byte-level tokenizer and meshes of scripted workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from scheduler_mesh import Mesh, MeshFactory, write_byte_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer"))


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, with a post-processor that starts every encoded text with <s> (Llama's convention)."""
    return write_byte_tokenizer(tmp_path_factory.mktemp("bos_tokenizer"), bos=True)


@pytest.fixture
async def mesh_factory(tokenizer_dir: Path) -> AsyncIterator[MeshFactory]:
    """make(prefill=1, decode=1, model=tokenizer_dir, **SchedulerConfig fields) -> a started Mesh;
    every one started is stopped after the test."""
    started: list[Mesh] = []

    async def make(prefill: int = 1, decode: int = 1, model: Path | None = None, **settings: Any) -> Mesh:
        mesh = Mesh(str(model or tokenizer_dir), settings)
        started.append(mesh)
        await mesh.start(prefill, decode)
        return mesh

    yield make
    for mesh in started:
        await mesh.stop()
