"""The embedded default model, SmolLM2-135M-Instruct from its GGUF file, answers correctly and
greedily as transformers does on the same file."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from tests.engine._tiny_models import smollm2_transformers_model
from tests.engine.conftest import assert_greedy_up_to_ties
from tests.engine.engine_helpers import run_to_completion


@pytest.fixture(scope="module")
def smollm2() -> Engine:
    return Engine.from_config(EngineConfig(model="smollm2", torch_threads=2))


def test_default_model_knows_the_capital_of_france(smollm2: Engine) -> None:
    tok = smollm2.tokenizer
    assert tok is not None
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    smollm2.add_request("paris", tok.encode(text), SamplingParams(max_tokens=24))
    outs = []
    while smollm2.has_work():
        outs += smollm2.step()
    answer = "".join(o.text_delta for o in outs)
    assert "Paris" in answer
    assert outs[-1].finished


def test_stop_string_cuts_the_answer_exactly(smollm2: Engine) -> None:
    tok = smollm2.tokenizer
    assert tok is not None
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    smollm2.add_request("cut", tok.encode(text), SamplingParams(max_tokens=24, stop=("Paris",)))
    outs = []
    while smollm2.has_work():
        outs += smollm2.step()
    answer = "".join(o.text_delta for o in outs)
    assert "Paris" not in answer and answer.endswith("is ")
    assert outs[-1].finish_reason.value == "stop"
    assert outs[-1].stop == "Paris"  # what matched rides on the last output
    assert run_to_completion(smollm2) == {}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_greedy_follows_transformers_on_the_same_gguf(dtype: str) -> None:
    # SmolLM2's real shapes (9 query heads on 3 KV heads, 16-token blocks) through the CPU paths:
    # oneDNN-packed linears and the batched decode attention; bfloat16 is how vLLM serves it on CPU.
    rng = random.Random(3)
    prompts = [[rng.randrange(0, 49152) for _ in range(n)] for n in (7, 40, 130)]
    engine = Engine.from_config(EngineConfig(model="smollm2", dtype=dtype, torch_threads=2))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    tokens = run_to_completion(engine)
    outputs = [tokens[f"r{i}"] for i in range(len(prompts))]
    # A copy: the loaded reference is cached for other tests, and Module.to casts in place.
    reference = copy.deepcopy(smollm2_transformers_model()).to(getattr(torch, dtype)).eval()
    if dtype == "bfloat16":
        assert_greedy_up_to_ties(reference, prompts, outputs)
        return
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs, strict=True):
            ids = torch.tensor([prompt])
            gen = reference.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0
            )
            assert gen[0, len(prompt) :].tolist() == out
