"""The embedded SmolLM2 through a real mesh (the shared smollm2_mesh) gives the single-process
engine's tokens exactly."""

from __future__ import annotations

import asyncio

import pytest

from engine.tokenizer import Tokenizer
from pdmesh.client import AsyncClient
from pdmesh.up import Mesh
from tests.mesh.conftest import engine_greedy

pytestmark = pytest.mark.slow


def test_smollm2_through_the_mesh_equals_the_engine(smollm2_mesh: Mesh) -> None:
    tok = Tokenizer.from_model("smollm2")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.encode(tok.apply_chat_template(chat))
    long_prompt = tok.encode("Here is a list of the planets of the solar system, in order: Mercury,") * 3
    expected = engine_greedy("smollm2", [prompt, long_prompt], 16)

    async def run() -> list[list[int]]:
        async with AsyncClient(smollm2_mesh.target) as client:
            outs = []
            for p in (prompt, long_prompt):
                stream = client.generate(p, max_tokens=16, ignore_eos=True)
                outs.append([t async for c in stream for t in c.token_ids])
            text = "".join([c.text async for c in client.generate(chat, max_tokens=16)])
            assert "Paris" in text
            return outs

    assert asyncio.run(run()) == expected
