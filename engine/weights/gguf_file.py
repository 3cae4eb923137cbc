"""A GGUF file (llama.cpp's format): metadata -> ModelConfig, tensors dequantized to HF layout.

Read through `gguf.GGUFReader` (a memory map; opening parses metadata and tensor headers only)
and `gguf.quants.dequantize`. Two things differ from a HF checkpoint and are undone here:

- names: llama.cpp calls `model.layers.3.self_attn.q_proj.weight` `blk.3.attn_q.weight`;
- layout: for the "llama" architecture, llama.cpp's converter permutes the rows of q_proj and
  k_proj inside each head from HF's rotate-half rope layout (first half, second half) to its own
  interleaved one (pairs). `_unpermute` is the exact inverse; "qwen2" files are not permuted.

Llama 3.x files carry their "llama3" rope scaling not as metadata but as a `rope_freqs.weight`
tensor of per-frequency factors; the parameters are recovered from it (and checked) here.

Torch is imported only in `tensors()`; the tokenizer reads this file's metadata without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from engine.errors import ModelLoadError, UnsupportedModel
from engine.model_config import ModelConfig, RopeScaling
from engine.weights.checks import check_tensor_set, library_errors

if TYPE_CHECKING:
    import torch

    from engine.tokenizer import Tokenizer

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DAMAGED = "re-download the file, or re-convert the model with llama.cpp's convert_hf_to_gguf.py"
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class GGUFFile:
    """A validated GGUF file; implements engine.weights.WeightSource."""

    path: Path
    config: ModelConfig
    files: tuple[Path, ...]
    reader: GGUFReader
    hf_names: dict[str, str]  # GGUF tensor name -> HF parameter name
    permuted: bool  # q/k rows in llama.cpp's rope layout

    @classmethod
    def open(cls, path: Path) -> GGUFFile:
        reader = open_reader(path)
        config = read_config(path, reader)
        hf_names = {t.name: hf_name(t.name) for t in reader.tensors if t.name != _ROPE_FREQS}
        shapes = {hf_names[t.name]: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors
                  if t.name in hf_names}
        check_tensor_set(path, shapes, config)
        return cls(path, config, (path,), reader, hf_names, permuted=field(reader, "general.architecture") == "llama")

    def tensors(self, dtype: torch.dtype, device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        heads = {"q_proj": self.config.num_heads, "k_proj": self.config.num_kv_heads}
        for t in self.reader.tensors:
            name = self.hf_names.get(t.name)
            if name is None:
                continue
            with library_errors(self.path, f"dequantizing {t.name} ({t.tensor_type.name})", _DAMAGED):
                array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)  # (out, in)
            weight = torch.from_numpy(array if array.flags.writeable else array.copy())
            proj = name.split(".")[-2]
            if self.permuted and proj in heads and name.endswith(".weight"):
                weight = _unpermute(weight, heads[proj])
            yield name, weight.to(dtype=dtype, device=device)

    def tokenizer(self) -> Tokenizer:
        from engine.tokenizer import Tokenizer

        return Tokenizer.from_gguf(self.path)


def open_reader(path: Path | str) -> GGUFReader:
    """Parse the file's metadata and tensor headers; a damaged file raises ModelLoadError."""
    with library_errors(path, "reading the GGUF file", _DAMAGED):
        return GGUFReader(path)


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value as plain Python (str, int, float, bool, or a list of those)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    if f.types[0] == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []
    part = f.parts[f.data[0]]
    return bytes(part).decode("utf-8") if f.types[0] == GGUFValueType.STRING else part[0].item()


def hf_name(gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor; unknown names come back unchanged (and get refused)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}"
    return gguf_name


def read_config(path: Path, reader: GGUFReader) -> ModelConfig:
    """The ModelConfig the metadata describes (llama.cpp's `<arch>.*` keys)."""
    arch = field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise UnsupportedModel(str(path), f"general.architecture is {arch!r}",
                               "the engine runs GGUF files of 'llama' (Llama, Mistral, SmolLM2) and 'qwen2' models")

    def get(key: str, default: Any = None) -> Any:
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(str(path), f"metadata key {arch}.{key} is missing", _DAMAGED)
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):
        raise UnsupportedModel(str(path), f"{arch}.attention.head_count_kv varies by layer",
                               "the engine needs one KV head count for every layer")
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedModel(str(path), f"{arch}.rope.dimension_count is not head_dim {head_dim}",
                               "the engine rotates whole heads; partial rotary models are not supported")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type != "none":
        raise UnsupportedModel(str(path), f"{arch}.rope.scaling.type is {scaling_type!r}",
                               "the engine implements default and Llama 3 rope only; use such a model")
    theta = float(get("rope.freq_base", 10000.0))
    tensors = {t.name: t for t in reader.tensors}
    scaling = None
    if _ROPE_FREQS in tensors:
        factors = dequantize(tensors[_ROPE_FREQS].data, tensors[_ROPE_FREQS].tensor_type)
        original = int(get("rope.scaling.original_context_length", 8192))
        scaling = _llama3_scaling(path, np.asarray(factors, np.float64), head_dim, theta, original)
    name = str(field(reader, "general.name", "")).lower()
    architecture = "MistralForCausalLM" if arch == "llama" and "mistral" in name else _ARCHITECTURES[arch]
    vocab = reader.fields.get("tokenizer.ggml.tokens")
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return ModelConfig(
        architecture=architecture,
        vocab_size=len(vocab.data) if vocab is not None else int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=arch == "qwen2",
        rope_scaling=scaling,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k permute: per head, rows (half, 2) back to (2, half)."""
    # w: (heads * head_dim, hidden), each head's rows ordered [r0, r_half, r1, r_half+1, ...]
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for "llama3" scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim // 2,)
    wavelen = 2 * np.pi / freqs
    low, high, old = scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position_embeddings
    smooth = (old / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, scaling.factor, blended))


def _llama3_scaling(path: Path, factors: np.ndarray, head_dim: int, theta: float, original: int) -> RopeScaling:
    """Recover Llama 3.x's parameters (every release uses low 1, high 4) from the stored factors."""
    candidate = RopeScaling(float(factors.max()), 1.0, 4.0, original)
    expected = llama3_rope_factors(candidate, head_dim, theta)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise UnsupportedModel(str(path), f"{_ROPE_FREQS} holds rope factors that are not Llama 3 'llama3' scaling",
                               "use the model's HF safetensors directory, whose config.json names its rope_scaling")
    return candidate
