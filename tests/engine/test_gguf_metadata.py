"""The fast GGUF metadata reader gives exactly what gguf.GGUFReader gives, for every key and type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine.errors import ModelLoadError
from engine.weights.default_model import resolve_model_path
from engine.weights.gguf_file import field, open_reader
from engine.weights.gguf_metadata import read_metadata


def _reader_metadata(path):
    reader = open_reader(path)
    return {k: field(reader, k) for k in reader.fields if not k.startswith("GGUF.")}


def test_the_embedded_models_metadata_matches_gguf_reader():
    path = resolve_model_path("smollm2")
    metadata = read_metadata(path)
    assert metadata == _reader_metadata(path)
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_every_value_type_reads_back(tmp_path, endianess):
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.5)
    w.add_uint64("t.u64", 2**63)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "é ünicode")
    w.add_array("t.strs", ["a", "", "ßß"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.25, -1.5])
    w.add_tensor("x", np.zeros((2, 2), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    metadata = read_metadata(path)
    assert metadata["t.u8"] == 200 and metadata["t.i8"] == -100
    assert metadata["t.u16"] == 60000 and metadata["t.i16"] == -30000
    assert metadata["t.u32"] == 4_000_000_000 and metadata["t.i32"] == -2_000_000_000
    assert metadata["t.u64"] == 2**63 and metadata["t.i64"] == -(2**62)
    assert metadata["t.f32"] == 0.5 and metadata["t.f64"] == 1e-300 and metadata["t.bool"] is True
    assert metadata["t.str"] == "é ünicode" and metadata["t.strs"] == ["a", "", "ßß"]
    assert metadata["t.ints"] == [1, -2, 3] and metadata["t.floats"] == [0.25, -1.5]
    assert metadata == _reader_metadata(path)


def test_damaged_files_raise_model_load_errors_naming_the_file(tmp_path):
    good = resolve_model_path("smollm2").read_bytes()[: 1 << 20]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:200_000])  # ends inside the vocabulary
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        read_metadata(cut)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"NOPE" + good[4:1000])
    with pytest.raises(ModelLoadError, match="no GGUF magic"):
        read_metadata(other)
