"""kernels/cpu_build.py: C sources compiled once, loaded through ctypes, and a clear BuildError
(the callers' cue to keep their torch paths) where a source does not compile."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from kernels.cpu_build import BuildError, _cache_dir, load_library

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler here"
)


def test_a_source_is_built_once_and_called(tmp_path: Path) -> None:
    source = tmp_path / "twice.c"
    source.write_text("int twice(int x) { return 2 * x; }\n")

    lib = load_library(source)
    lib.twice.argtypes, lib.twice.restype = [ctypes.c_int], ctypes.c_int

    assert lib.twice(21) == 42
    assert load_library(source) is lib  # the loaded library is kept, not rebuilt


def test_a_source_that_does_not_compile_raises_build_error(tmp_path: Path) -> None:
    source = tmp_path / "broken.c"
    source.write_text("int broken( {\n")

    with pytest.raises(BuildError, match="broken.c"):
        load_library(source)


def test_a_cache_directory_others_may_write_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, temp = tmp_path / "home", tmp_path / "temp"
    shared = home / ".cache" / "pdmesh" / "kernels"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # anyone could plant a shared object here
    temp.mkdir()
    monkeypatch.setattr(Path, "home", lambda: home)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(temp))

    chosen = _cache_dir()

    assert chosen == temp / f"pdmesh-{os.getuid()}" / "kernels"
    assert not chosen.stat().st_mode & 0o022
