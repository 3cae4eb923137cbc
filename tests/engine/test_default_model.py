"""The embedded default model, SmolLM2-135M-Instruct from its GGUF file, answers correctly."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
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
    assert run_to_completion(smollm2) == {}
