"""Write a random-weight Hugging Face model directory in real shapes, so a mesh can serve it.

No checkpoint travels to the GPU machine: this writes one there, in the layout `--model DIR`
loads (config.json, generation_config.json, bf16 *.safetensors shards with their index,
tokenizer.json and tokenizer_config.json). The default shape is Llama-3.1-8B's (~16 GB):

    python bench/random_model.py /tmp/llama8b-random                   # GPU machine, ~16 GB
    python bench/random_model.py /tmp/tiny --shape tiny                  # a few MB, for CPU tests
    python bench/random_model.py DIR --hidden 1024 --layers 4 --vocab 32000  # any Llama shape

The tokenizer is a WordLevel vocabulary with one token per id ("t0", "t1", ... and Llama 3's
special tokens at their ids), so prompts of random token ids round-trip and text detokenizes to
something readable. Weights are filled uniformly at the variance of a 0.02-std normal (uniform
fills far faster than normal on CPU; the distribution does not matter to a load test), on the GPU
when there is one. The tensor names and shapes come from the engine's own list
(engine.weights.checks.parameter_shapes), so what this writes is what the engine expects.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model_config import ModelConfig, RopeScaling  # noqa: E402
from engine.weights.checks import parameter_shapes  # noqa: E402

LLAMA_3_1_8B = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=False,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
)  # fmt: skip

# Small enough to load and serve on two CPU cores in a second; still GQA, several layers.
TINY = replace(
    LLAMA_3_1_8B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1000, eos_token_ids=(1001,),
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=512),
)  # fmt: skip

SHAPES = {"llama-3.1-8b": LLAMA_3_1_8B, "tiny": TINY}
INIT_STD = 0.02
SHARD_BYTES = 5 << 30  # what save_pretrained writes by default


def special_tokens(config: ModelConfig) -> dict[int, str]:
    """Llama 3's names for the BOS and EOS ids; every other id is a plain word."""
    names = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    special = {config.eos_token_ids[i]: names[i] for i in range(len(config.eos_token_ids))}
    if config.bos_token_id is not None:
        special[config.bos_token_id] = "<|begin_of_text|>"
    return special


def write_tokenizer(directory: Path, config: ModelConfig) -> None:
    special = special_tokens(config)
    vocab = {special.get(i, f"t{i}"): i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(special.values()))
    tok.save(str(directory / "tokenizer.json"))
    eos = special[config.eos_token_ids[-1]] if config.eos_token_ids else None
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer_config = {
        "bos_token": special.get(config.bos_token_id) if config.bos_token_id is not None else None,
        "eos_token": eos, "chat_template": template, "model_max_length": config.max_position_embeddings,
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_configs(directory: Path, config: ModelConfig, dtype: torch.dtype) -> None:
    hf = {
        "architectures": [config.architecture], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
    }  # fmt: skip
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))


def random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, gen: torch.Generator
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    bound = INIT_STD * math.sqrt(3.0)  # uniform(-b, b) has the variance of normal(0, INIT_STD)
    t = torch.empty(shape, dtype=dtype, device=device).uniform_(-bound, bound, generator=gen)
    return t.cpu()


def shard_plan(shapes: dict[str, tuple[int, ...]], elem: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * elem
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(directory: Path, config: ModelConfig, dtype: torch.dtype, device: str, seed: int,
                  shard_bytes: int = SHARD_BYTES) -> int:
    """Write the shards and their index; returns the bytes written."""
    shapes = parameter_shapes(config)
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(seed)
    shards = shard_plan(shapes, elem, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], dtype, device, gen) for n in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * elem for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        print(f"  {file}: {len(names)} tensors", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_model(directory: Path, config: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                device: str = "cpu", seed: int = 0, shard_bytes: int = SHARD_BYTES) -> int:
    """The whole directory; returns the bytes of weights written."""
    directory.mkdir(parents=True, exist_ok=True)
    write_configs(directory, config, dtype)
    write_tokenizer(directory, config)
    return write_weights(directory, config, dtype, device, seed, shard_bytes)


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    config = SHAPES[args.shape]
    overrides = {
        "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.ffn,
        "num_layers": args.layers, "num_heads": args.heads, "num_kv_heads": args.kv_heads,
        "max_position_embeddings": args.max_position,
    }  # fmt: skip
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if args.hidden is not None or args.heads is not None:
        config = replace(config, head_dim=config.hidden_size // config.num_heads)
    top = config.vocab_size - 1
    if config.bos_token_id is not None and config.bos_token_id > top or any(e > top for e in config.eos_token_ids):
        # A smaller vocabulary than the shape's: put the specials at its end.
        config = replace(config, bos_token_id=top - 1, eos_token_ids=(top,))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--ffn", type=int, default=None, help="intermediate (MLP) size")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--max-position", type=int, default=None, help="max_position_embeddings")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random numbers are drawn (cuda is far faster for 8B)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = config_from_args(args)
    t = time.perf_counter()
    total = write_model(args.directory, config, getattr(torch, args.dtype), args.device, args.seed)
    print(f"wrote {args.directory}: {total / 1e9:.2f} GB of {args.dtype} weights, vocab {config.vocab_size}, "
          f"{config.num_layers} layers, in {time.perf_counter() - t:.1f} s")  # fmt: skip
    print(f"serve it:  pdmesh up --model {args.directory}")


if __name__ == "__main__":
    main()
