"""Tiny random Llama-family checkpoints, saved in Hugging Face format by transformers itself.

Each is small enough to run a whole oracle comparison in a second on two cores, but has several
layers, grouped-query attention and weights large enough that greedy decoding is decisive (the
default 0.02 init makes nearly flat logits, where any rounding difference flips a token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

VOCAB = 320


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer with no merges: every byte is a token (ids 0..255), plus specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def save_tiny_model(path: Path, arch: str = "llama", tied: bool = False, seed: int = 0, **overrides: object) -> Path:
    import transformers

    common: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        initializer_range=0.25,
        bos_token_id=256,
        eos_token_id=None,  # so transformers' greedy run never stops early; the engine uses ignore_eos
    )
    common.update(overrides)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama_tied"), tied=True, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2", seed=2)


def hf_greedy(
    path: Path, prompts: list[list[int]], max_new_tokens: int, dtype: torch.dtype = torch.float32
) -> list[list[int]]:
    """transformers' own greedy continuation of each prompt, one at a time (no padding effects)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            # An explicit mask: generate() would otherwise mask every prompt token equal to pad.
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=0,
            )
            outs.append(gen[0, len(prompt) :].tolist())
    return outs


def assert_greedy_up_to_ties(model: Any, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """Each generated token is transformers' argmax after the same prefix (teacher-forced along the
    engine's own output), or within one unit in the last place of the model's dtype of it.

    For 16-bit runs: logits in bfloat16 are coarse enough that two tokens can tie to the last bit,
    and which one wins then depends on rounding order alone (transformers against itself at another
    batch shape included), so exact equality is the float32 oracle's test, not this one."""
    eps = torch.finfo(model.dtype).eps
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0].float()
        steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(out)]  # (len(out), vocab)
        best = steps.max(dim=-1).values
        chosen = steps.gather(1, torch.tensor(out)[:, None]).squeeze(1)
        ulp = eps * best.abs()  # at least one unit in the last place of best
        assert bool((chosen >= best - ulp).all()), f"prompt {prompt[:8]}...: {out} strays from transformers' argmax"


def hf_model(path: Path, dtype: torch.dtype) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
