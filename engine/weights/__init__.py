"""Model weights on disk, as the engine sees them: a config, a fingerprint, tensors, a tokenizer.

    ckpt = load_checkpoint("smollm2")            # or a HF directory, or a .gguf file
    ckpt.config                                  # ModelConfig, validated
    for name, tensor in ckpt.tensors(torch.bfloat16, "cuda"):
        ...                                      # HF names, q/k in HF layout, one tensor at a time
    ckpt.tokenizer()

Two formats: a local Hugging Face directory (config.json + safetensors, hf.py) and a GGUF file,
dequantized at load (gguf_file.py). Nothing is ever unpickled: pytorch_model.bin and other
pickle files are refused. Loading reads headers only; weights are read when `tensors()` runs.

Importing this package does not import torch (hf.py and gguf_file.py import it where they make
tensors), so the torch-free scheduler can resolve models and build tokenizers through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from engine.errors import ModelLoadError
from engine.model_config import ModelConfig
from engine.weights.default_model import DEFAULT_MODEL, resolve_model_path

if TYPE_CHECKING:
    import torch

    from engine.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "Checkpoint", "WeightSource", "load_checkpoint", "weights_digest"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class WeightSource(Protocol):
    """One on-disk format. Implementations: hf.HFDirectory, gguf_file.GGUFFile."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def files(self) -> tuple[Path, ...]:
        """The weight files, in a stable order (hashed into the fingerprint)."""
        ...

    def tensors(self, dtype: torch.dtype, device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter by HF name, read and converted one at a time."""
        ...

    def tokenizer(self) -> Tokenizer: ...


@dataclass(frozen=True)
class Checkpoint:
    """A validated model on disk. Cheap to hold: weights stay in their files until `tensors()`."""

    path: Path
    config: ModelConfig
    fingerprint: str  # config + weights_digest: equal only for the same architecture and weights
    _source: WeightSource = field(repr=False, compare=False)

    def tensors(
        self, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, tensor) pairs; lm_head.weight only when not tied to the embedding.

        Each tensor is read, dequantized or cast, and moved before the next is touched, so at most
        one tensor's staging copy exists beside what the caller keeps.
        """
        return self._source.tensors(dtype, device)

    def tokenizer(self) -> Tokenizer:
        return self._source.tokenizer()


def load_checkpoint(name_or_path: str | Path) -> Checkpoint:
    """Resolve, read the config and every tensor header, and validate them against each other."""
    path = resolve_model_path(name_or_path)
    source = open_source(path)
    fingerprint = source.config.fingerprint(weights_digest(source.files))
    return Checkpoint(path=path, config=source.config, fingerprint=fingerprint, _source=source)


def open_source(path: Path) -> WeightSource:
    """The reader for what `path` is: a HF directory or a GGUF file; anything else is refused."""
    if not path.exists():
        raise ModelLoadError(
            str(path),
            "no such file or directory",
            f"pass a local Hugging Face model directory, a .gguf file, or {DEFAULT_MODEL!r}",
        )
    if path.is_dir():
        from engine.weights.hf import HFDirectory

        return HFDirectory.open(path)
    if path.suffix == ".gguf" or _has_gguf_magic(path):
        from engine.weights.gguf_file import GGUFFile

        return GGUFFile.open(path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise ModelLoadError(
            str(path),
            "pickled PyTorch weights are never loaded (unpickling runs arbitrary code)",
            "convert the model to safetensors (transformers: save_pretrained(dir, safe_serialization=True))"
            " and pass its directory",
        )
    if path.suffix == ".safetensors":
        raise ModelLoadError(
            str(path), "a single weight file has no config", "pass the directory holding it and config.json"
        )
    raise ModelLoadError(
        str(path), "is neither a model directory nor a GGUF file", "pass a HF model directory or a .gguf file"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# The fingerprint must tell checkpoints apart without reading them whole: hashing every byte of a
# 100 GB checkpoint would cost minutes at each worker start. Each file contributes its size, its
# first and last MiB (the safetensors/GGUF header, which lists every tensor's name, dtype, shape
# and offset, plus the first and last tensors' bytes) and 16 evenly spaced 64 KiB samples of the
# middle. Any fine-tune changes bytes at those places (at least the norms and the samples), while
# a re-download of the same files hashes the same. What it cannot see: an edit confined to bytes
# between samples of a file of unchanged size and header.
_EDGE_BYTES = 1 << 20
_INNER_SAMPLES = 16
_INNER_BYTES = 1 << 16


def weights_digest(files: Sequence[Path]) -> str:
    """A content-sensitive digest of weight files that reads about 3 MiB of each."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for offset, length in _sample_spans(size):
                f.seek(offset)
                digest.update(f.read(length))
    return digest.hexdigest()


def _sample_spans(size: int) -> Iterator[tuple[int, int]]:
    yield 0, _EDGE_BYTES
    for k in range(1, _INNER_SAMPLES + 1):
        yield size * k // (_INNER_SAMPLES + 1), _INNER_BYTES
    yield max(size - _EDGE_BYTES, 0), _EDGE_BYTES
