"""Checks both weight formats share: the tensor set a ModelConfig implies, and library errors.

The engine's model names its parameters exactly as Hugging Face's Llama does
("model.layers.0.self_attn.q_proj.weight"), so a checkpoint is usable when it holds exactly the
tensors `parameter_shapes(config)` lists, with those shapes. Checking this from the file headers
at load turns a wrong or half-converted checkpoint into one clear error before any weight is read.

Torch-free: the scheduler imports the tokenizer, which reaches this package.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from engine.errors import EngineError, ModelLoadError, UnsupportedModel
from engine.model_config import ModelConfig

# Tensors some checkpoints carry that the model recomputes or shares; skipped, never an error.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model `config` describes, HF-named, with its shape."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def is_ignored(name: str, config: ModelConfig) -> bool:
    """A stored tensor the model does not load: rotary caches, and lm_head when tied to the embedding."""
    return name.endswith(_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")


def check_tensor_set(path: Path, found: Mapping[str, tuple[int, ...]], config: ModelConfig) -> None:
    """Raise unless `found` (HF name -> shape, ignorable tensors included) is exactly the model's set."""
    expected = parameter_shapes(config)
    for name, shape in found.items():
        if is_ignored(name, config):
            continue
        if name not in expected:
            raise UnsupportedModel(
                str(path),
                f"tensor {name} is not part of a {config.architecture} as the engine builds it",
                "use a plain Llama-family checkpoint (no extra biases, adapters or vision towers)",
            )
        if tuple(shape) != expected[name]:
            raise ModelLoadError(
                str(path),
                f"tensor {name} has shape {tuple(shape)}, the config implies {expected[name]}",
                "the weights and the config describe different models; re-download or re-convert them together",
            )
    missing = [name for name in expected if name not in found]
    if missing:
        raise ModelLoadError(
            str(path),
            f"{len(missing)} tensors are missing, first {missing[0]}",
            "the checkpoint is incomplete; re-download or re-convert it",
        )


@contextmanager
def library_errors(path: Path | str, what: str, fix: str) -> Iterator[None]:
    """Re-raise anything a file-format library throws as ModelLoadError naming the file.

    Libraries report a damaged file from deep inside themselves (a reshape that fails, a header
    that does not parse); the caller gets the path, what was being read, and the fix instead.
    """
    try:
        yield
    except EngineError:
        raise
    except Exception as e:
        raise ModelLoadError(str(path), f"{what} failed ({type(e).__name__}: {e})", fix) from e
