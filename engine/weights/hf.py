"""A local Hugging Face model directory: config.json -> ModelConfig, *.safetensors -> tensors.

Reads config.json (and generation_config.json for stop tokens), refuses what the engine does not
implement with the field and the fix, finds the weight files (one file, or shards listed by
model.safetensors.index.json) and checks every tensor header against the config. Weights are
read through `safetensors.safe_open`, one tensor at a time; pickles are never opened.

Knows nothing of GGUF. Torch is only reached through safe_open(framework="pt") in `tensors()`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from engine.errors import ModelLoadError, UnsupportedModel
from engine.model_config import ModelConfig, RopeScaling
from engine.weights.checks import check_tensor_set, is_ignored, library_errors

if TYPE_CHECKING:
    import torch

    from engine.tokenizer import Tokenizer

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_REDOWNLOAD = "re-download the file or re-save the model with save_pretrained(..., safe_serialization=True)"


@dataclass(frozen=True)
class HFDirectory:
    """A validated HF directory; implements engine.weights.WeightSource."""

    path: Path
    config: ModelConfig
    files: tuple[Path, ...]

    @classmethod
    def open(cls, directory: Path) -> HFDirectory:
        config = read_config(directory)
        files = weight_files(directory)
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with (
                library_errors(file, "reading the safetensors header", _REDOWNLOAD),
                safe_open(str(file), framework="numpy") as f,
            ):
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in list(f.keys())})
        check_tensor_set(directory, shapes, config)
        return cls(path=directory, config=config, files=files)

    def tensors(self, dtype: torch.dtype, device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            with library_errors(file, "reading tensors", _REDOWNLOAD), safe_open(str(file), framework="pt") as f:
                for name in list(f.keys()):
                    if not is_ignored(name, self.config):
                        yield name, f.get_tensor(name).to(dtype=dtype, device=device)

    def tokenizer(self) -> Tokenizer:
        from engine.tokenizer import Tokenizer

        return Tokenizer.from_hf_dir(self.path)


def weight_files(directory: Path) -> tuple[Path, ...]:
    """The safetensors files holding the weights: the index's shards, model.safetensors, or all."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(str(index), "weight_map is missing or empty", _REDOWNLOAD)
        files = tuple(directory / name for name in sorted(set(weight_map.values())))
        for file in files:
            if not file.exists():
                raise ModelLoadError(str(file), "a shard listed in model.safetensors.index.json is missing",
                                     "download every shard the index lists")
        return files
    if (directory / "model.safetensors").exists():
        return (directory / "model.safetensors",)
    files = tuple(sorted(directory.glob("*.safetensors")))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise ModelLoadError(
            str(directory / pickles[0]),
            "pickled PyTorch weights are never loaded (unpickling runs arbitrary code)",
            "convert the model to safetensors, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
        )
    raise ModelLoadError(str(directory), "holds no *.safetensors weight files",
                         "download the model's safetensors weights into this directory")


def read_config(directory: Path) -> ModelConfig:
    """config.json as a ModelConfig; UnsupportedModel names the field the engine cannot run."""
    path = directory / "config.json"
    if not path.exists():
        raise ModelLoadError(str(path), "config.json is missing",
                             "a HF model directory needs the config.json that came with its weights")
    raw = read_json(path)
    architecture = _architecture(path, raw)
    _refuse_unsupported(path, raw, architecture)
    hidden, heads = _int(path, raw, "hidden_size"), _int(path, raw, "num_attention_heads")
    kv_heads = _int(path, raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelLoadError(str(path), f"num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}", "fix config.json to match the weights")
    theta, scaling = _rope(path, raw)
    bos, eos = read_special_ids(directory)
    return ModelConfig(
        architecture=architecture,
        vocab_size=_int(path, raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(path, raw, "intermediate_size"),
        num_layers=_int(path, raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_int(path, raw, "head_dim", hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=_int(path, raw, "max_position_embeddings"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=architecture == "Qwen2ForCausalLM",
        rope_scaling=scaling,
        bos_token_id=bos,
        eos_token_ids=eos,
    )


def read_special_ids(directory: Path) -> tuple[int | None, tuple[int, ...]]:
    """(bos id, eos ids) from config.json, generation_config.json's eos winning (generation uses it)."""
    config, generation = (_read_optional(directory / n) for n in ("config.json", "generation_config.json"))
    bos = config.get("bos_token_id", generation.get("bos_token_id"))
    eos = generation.get("eos_token_id")
    if eos is None:
        eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return (int(bos) if isinstance(bos, int) else None), tuple(dict.fromkeys(int(e) for e in eos_ids))


def read_json(path: Path) -> dict[str, Any]:
    with library_errors(path, "parsing JSON", "restore the file from the model's repository"):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ModelLoadError(str(path), "is not a JSON object", "restore the file from the model's repository")
    return data


def _read_optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


def _architecture(path: Path, raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or [_BY_MODEL_TYPE.get(str(raw.get("model_type")), "")]
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise UnsupportedModel(
            str(path),
            f"architectures is {names!r} (model_type {raw.get('model_type')!r})",
            f"the engine runs {', '.join(ARCHITECTURES)} checkpoints; pick one of those",
        )
    return str(names[0])


def _refuse_unsupported(path: Path, raw: dict[str, Any], architecture: str) -> None:
    """Features a Llama-family config can switch on that the engine's model does not implement."""
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(str(path), f"hidden_act is {raw['hidden_act']!r}",
                               "the engine implements SiLU-gated MLPs only; use a checkpoint with hidden_act silu")
    if raw.get("quantization_config"):
        quant = raw["quantization_config"]
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UnsupportedModel(str(path), f"quantization_config is set (quant_method {method!r})",
                               "use unquantized safetensors weights, or a GGUF file (dequantized at load)")
    for key in ("attention_bias", "mlp_bias"):
        if architecture != "Qwen2ForCausalLM" and raw.get(key):
            raise UnsupportedModel(str(path), f"{key} is true",
                                   "the engine's Llama has no such biases; use a checkpoint without them")
    window = raw.get("sliding_window")
    max_pos = _int(path, raw, "max_position_embeddings")
    in_use = isinstance(window, int) and window < max_pos
    if architecture == "Qwen2ForCausalLM":
        in_use = in_use and bool(raw.get("use_sliding_window"))
    if architecture != "LlamaForCausalLM" and in_use:
        raise UnsupportedModel(
            str(path),
            f"sliding_window is {window}, below max_position_embeddings {max_pos}; the engine attends "
            "over the whole context",
            f"set max_position_embeddings to at most {window} in config.json (full attention is then exact), "
            "or use a checkpoint without a sliding window",
        )


def _rope(path: Path, raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling). transformers 5 writes both into "rope_parameters"; older configs
    use "rope_theta" and "rope_scaling"."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    theta = float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModel(str(path), f"rope_scaling.rope_type is {rope_type!r}",
                               "the engine implements 'default' and 'llama3' rope only; use such a checkpoint")
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(str(path), f"rope_scaling (llama3) lacks or mistypes {e}",
                             "restore config.json from the model's repository") from e


def _int(path: Path, raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key)
    if value is None:
        if default is None:
            raise ModelLoadError(str(path), f"{key} is missing", "restore config.json from the model's repository")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(str(path), f"{key} is {value!r}, not a positive integer",
                             "restore config.json from the model's repository")
    return value
