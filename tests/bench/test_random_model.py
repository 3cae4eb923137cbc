"""bench/random_model.py writes a model directory the engine and transformers both load.

The 8B shape is only written on the GPU machine; here the same code writes the tiny shape and a
sharded one, and the engine generates from it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from bench.random_model import LLAMA_3_1_8B, TINY, shard_plan, write_model
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from engine.weights.checks import parameter_shapes
from engine.weights.hf import HFDirectory


def test_the_tiny_shape_loads_and_generates(tmp_path: Path) -> None:
    write_model(tmp_path, TINY)
    assert HFDirectory.open(tmp_path).config == TINY  # every field, rope scaling and special ids included
    tok = Tokenizer.from_model(tmp_path)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (1024, 1000, (1001,))
    assert tok.encode("t5 t6 t7") == [5, 6, 7] and tok.decode([5, 6, 7]) == "t5 t6 t7"
    assert tok.apply_chat_template([{"role": "user", "content": "t9"}]).startswith("<|begin_of_text|>")
    engine = Engine.from_config(EngineConfig(model=str(tmp_path), torch_threads=1))
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True))
    tokens = [t for _ in iter(engine.has_work, False) for o in engine.step() for t in o.new_token_ids]
    assert len(tokens) == 6 and all(0 <= t < 1024 for t in tokens)


def test_transformers_reads_the_directory_as_a_llama(tmp_path: Path) -> None:
    import transformers

    write_model(tmp_path, TINY, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    ours = {n: tuple(s) for n, s in parameter_shapes(TINY).items()}
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == ours
    weights = model.state_dict()["model.layers.0.mlp.up_proj.weight"].float()
    assert 0.015 < weights.std().item() < 0.025  # the 0.02 init, so activations stay finite


def test_big_shapes_are_split_into_shards_with_an_index(tmp_path: Path) -> None:
    shapes = parameter_shapes(LLAMA_3_1_8B)
    shards = shard_plan(shapes, elem=2, shard_bytes=5 << 30)
    assert len(shards) == 4 and sorted(n for s in shards for n in s) == sorted(shapes)
    write_model(tmp_path, replace(TINY, num_layers=3), shard_bytes=100_000)  # several shards of a tiny model
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert HFDirectory.open(tmp_path).config.num_layers == 3
