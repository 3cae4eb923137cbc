"""The oracle on CUDA: the Triton decode kernel, CUDA graphs and bf16 against transformers.

Runs on the lent GPU machine only (marker gpu). float32 must give transformers' tokens exactly;
bf16 must give logits close to transformers' bf16 logits (rounding differs, so tokens may not).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.config import BatcherConfig, CacheConfig, EngineConfig
from engine.engine import Engine
from tests.engine.conftest import hf_greedy
from tests.engine.engine_helpers import greedy, run_to_completion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_engine(path: Path, dtype: str, **batcher: int) -> Engine:
    config = EngineConfig(
        model=str(path), device="cuda", dtype=dtype,
        cache=CacheConfig(block_size=4, num_blocks=256),
        batcher=BatcherConfig(**batcher) if batcher else BatcherConfig(),
    )  # fmt: skip
    return Engine.from_config(config)


@pytest.mark.parametrize("batcher", [{}, {"max_batched_tokens": 8, "max_prefill_chunk": 6}])
def test_float32_on_cuda_matches_transformers(tiny_llama: Path, batcher: dict[str, int]) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (1, 5, 17, 33, 40)]
    engine = cuda_engine(tiny_llama, "float32", **batcher)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(12))
    tokens = run_to_completion(engine)
    assert [tokens[f"r{i}"] for i in range(len(prompts))] == hf_greedy(tiny_llama, prompts, 12)


def test_bf16_decode_logits_are_close_to_transformers(tiny_llama: Path) -> None:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).cuda().eval()
    engine = cuda_engine(tiny_llama, "bfloat16")
    prompt = list(range(3, 40))
    engine.add_request("a", prompt, greedy(1))
    plan = engine.batcher.schedule()
    inputs = engine.runner.prepare(plan.chunks)
    ours = engine.runner.execute(inputs)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 2e-2, f"relative logit error {rel:.4f}"
