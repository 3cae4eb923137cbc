"""A GGUF file's metadata (its key-value section) as plain Python values, read in milliseconds.

Why not `gguf.GGUFReader`: it parses the whole header into numpy views, one or two per array
element, and a tokenizer's metadata is two arrays of about 50,000 strings each (the vocabulary and
the merges): 3-10 s of pure Python for SmolLM2, paid by the scheduler at every start just to read
its tokenizer. This reader walks the same key-value section with `struct` and keeps only decoded
values; numeric arrays go through one `numpy.frombuffer`. It stops before the tensor headers:
what needs tensors (gguf_file.py) keeps using GGUFReader.

The layout (GGUF v2 and v3, llama.cpp's ggml/docs/gguf.md): magic "GGUF", uint32 version, uint64
tensor count, uint64 key-value count, then per pair a string key, a uint32 value type and the
value; a string is a uint64 length and UTF-8 bytes; an array is a uint32 item type, a uint64
count and the items. Files written on big-endian hosts are read too (the version tells).

Torch-free.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGUFValueType

from engine.errors import ModelLoadError
from engine.weights.checks import library_errors

_SUPPORTED_VERSIONS = (2, 3)
_DAMAGED = "re-download the file, or re-convert the model with llama.cpp's convert_hf_to_gguf.py"
# value type -> (struct code, numpy dtype) of the fixed-size scalars
_SCALARS: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("B", "u1"),
    GGUFValueType.INT8: ("b", "i1"),
    GGUFValueType.UINT16: ("H", "u2"),
    GGUFValueType.INT16: ("h", "i2"),
    GGUFValueType.UINT32: ("I", "u4"),
    GGUFValueType.INT32: ("i", "i4"),
    GGUFValueType.FLOAT32: ("f", "f4"),
    GGUFValueType.BOOL: ("?", "?"),
    GGUFValueType.UINT64: ("Q", "u8"),
    GGUFValueType.INT64: ("q", "i8"),
    GGUFValueType.FLOAT64: ("d", "f8"),
}


def read_metadata(path: Path | str) -> dict[str, Any]:
    """Every metadata key of the file -> its value (str, int, float, bool, or a list of those)."""
    with (
        library_errors(path, "reading the GGUF metadata", _DAMAGED),
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data,
    ):
        return _Cursor(str(path), data).metadata()


class _Cursor:
    """A read position in the file's bytes and the byte order the version announced."""

    def __init__(self, path: str, data: mmap.mmap) -> None:
        self.path, self.data, self.offset = path, data, 0
        self.order: Literal["<", ">"] = "<"

    def metadata(self) -> dict[str, Any]:
        if bytes(self.data[:4]) != b"GGUF":
            raise ModelLoadError(self.path, "is not a GGUF file (no GGUF magic)", _DAMAGED)
        self.offset = 4
        version = self._unpack("I")
        if version & 0xFFFF == 0:  # written on a big-endian host
            self.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in _SUPPORTED_VERSIONS:
            raise ModelLoadError(self.path, f"GGUF version {version} is not supported", _DAMAGED)
        self._unpack("Q")  # tensor count: the tensors are not read here
        count = self._unpack("Q")
        return {self._string(): self._value(GGUFValueType(self._unpack("I"))) for _ in range(count)}

    def _value(self, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind == GGUFValueType.ARRAY:
            item, count = GGUFValueType(self._unpack("I")), self._unpack("Q")
            return self._array(item, count)
        return self._unpack(_SCALARS[kind][0])

    def _array(self, item: GGUFValueType, count: int) -> list[Any]:
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item][1]).newbyteorder(self.order)
            values = np.frombuffer(self.data, dtype, count, self.offset)
            self.offset += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(count)]

    def _string(self) -> str:
        length = self._unpack("Q")
        start, self.offset = self.offset, self.offset + length
        if self.offset > len(self.data):
            raise ModelLoadError(self.path, "the metadata runs past the end of the file", _DAMAGED)
        return self.data[start : self.offset].decode("utf-8")

    def _unpack(self, code: str) -> Any:
        fmt = self.order + code
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value
