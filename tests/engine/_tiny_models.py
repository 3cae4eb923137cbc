"""Tiny checkpoints written by the tests, and transformers' readings of the embedded SmolLM2.

Plain helpers (no fixtures): the weight and tokenizer tests share them, and the expensive
transformers references are cached for the whole session.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from engine.weights.default_model import default_model_path

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def save_hf_model(directory: Path, kind: str = "llama", max_shard_size: str | None = None,
                  **overrides: Any) -> dict[str, torch.Tensor]:
    """A random tiny Llama/Qwen2 saved as safetensors; returns the state dict as transformers saves it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    model = model_cls(config_cls(**{**TINY, **overrides}))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_tokens() -> list[str]:
    """A 256-token byte-level vocabulary (one token per byte), spelled in GPT-2's byte alphabet."""
    from engine.weights.gguf_tokenizer import _bytes_to_unicode

    table = _bytes_to_unicode()
    return [table[b] for b in range(256)]


def write_gguf(path: Path, state: dict[str, torch.Tensor], arch: str = "llama", heads: int = 4, kv_heads: int = 2,
               extra_tensors: dict[str, np.ndarray] | None = None, tokenizer_model: str = "gpt2",
               quantize_embedding: bool = False) -> None:
    """Write a HF state dict as llama.cpp would: GGUF names, permuted q/k (llama only), F32 tensors."""
    from engine.weights.gguf_file import _GLOBAL_NAMES, _LAYER_NAMES

    to_gguf = {v: k for k, v in _GLOBAL_NAMES.items()}
    to_gguf.update({f"model.layers.{i}.{v}": f"blk.{i}.{k}" for i in range(8) for k, v in _LAYER_NAMES.items()})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(byte_tokens())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, tensor in state.items():
        array = tensor.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, kv_heads)
        if quantize_embedding and name == "model.embed_tokens.weight":
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(to_gguf[name], q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(to_gguf[name], array)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@functools.cache
def smollm2_transformers_model() -> Any:
    """transformers' own load of the embedded SmolLM2 GGUF (about 1.5 GB RAM, ~15 s): the oracle."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@functools.cache
def smollm2_transformers_tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
