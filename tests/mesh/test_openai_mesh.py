"""The OpenAI HTTP door over a real SmolLM2 mesh (scheduler, prefill and decode processes, KV
over UCX), through the real openai SDK: answers, the gRPC door's exact greedy output, usage with
cached tokens, logprobs, refusals, a client that leaves mid-stream, and 50 streams at once."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import openai
import pytest

from engine.tokenizer import Tokenizer
from pdmesh.client import AsyncClient
from pdmesh.up import Mesh
from tests.mesh.conftest import SMOLLM2_API_KEY
from tests.mesh.test_mesh import all_free, settled

pytestmark = pytest.mark.slow

KEY = SMOLLM2_API_KEY
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def mesh(smollm2_mesh: Mesh) -> Mesh:
    return smollm2_mesh


def sdk(mesh: Mesh, api_key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mesh.spec.http_base_url}/v1", api_key=api_key, max_retries=0)


def token_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 20000) for _ in range(n)] for n in lengths]


async def grpc_text(mesh: Mesh, prompt: Any, max_tokens: int) -> tuple[str, int]:
    async with AsyncClient(mesh.target) as client:
        chunks = [c async for c in client.generate(prompt, max_tokens=max_tokens, ignore_eos=True)]
    return "".join(c.text for c in chunks), sum(len(c.token_ids) for c in chunks)


def test_a_streamed_chat_answer_names_paris(mesh: Mesh) -> None:
    async def run() -> tuple[str, list[str | None]]:
        async with sdk(mesh) as client:
            stream = await client.chat.completions.create(
                model="smollm2", messages=PARIS, max_tokens=24, temperature=0, stream=True  # type: ignore[arg-type]
            )
            chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return text, [c.choices[0].finish_reason for c in chunks]

    text, reasons = asyncio.run(run())
    assert "Paris" in text
    assert reasons[-1] in ("stop", "length") and set(reasons[:-1]) == {None}


@pytest.mark.parametrize("length", [8, 120], ids=["local-prefill", "handed-off"])
def test_a_completion_equals_the_grpc_doors_greedy_output(mesh: Mesh, length: int) -> None:
    prompt = token_prompts([length], seed=length)[0]

    async def run() -> tuple[Any, tuple[str, int]]:
        async with sdk(mesh) as client:
            answer = await client.completions.create(
                model="smollm2", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
            )
        return answer, await grpc_text(mesh, prompt, 16)

    answer, (text, num_tokens) = asyncio.run(run())
    assert answer.choices[0].text == text
    assert answer.usage.completion_tokens == num_tokens == 16
    assert answer.usage.prompt_tokens == length and answer.choices[0].finish_reason == "length"


def test_usage_counts_the_chat_template_and_the_cached_prefix(mesh: Mesh) -> None:
    tokenizer = Tokenizer.from_model("smollm2")
    messages = [{"role": "system", "content": "You answer in one short sentence. " * 4}, *PARIS]
    num_prompt = len(tokenizer.encode(tokenizer.apply_chat_template(messages)))

    async def run() -> list[Any]:
        async with sdk(mesh) as client:
            return [
                await client.chat.completions.create(
                    model="smollm2", messages=messages, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                    extra_body={"ignore_eos": True}, logprobs=True,
                )
                for _ in range(2)
            ]  # fmt: skip

    first, again = asyncio.run(run())
    for answer in (first, again):
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (num_prompt, 6)
        assert answer.usage.total_tokens == num_prompt + 6
    # The first computed the prompt (a handed-off prompt's KV is not counted as cached); the same
    # prompt again is served from a prefix cache.
    assert first.usage.prompt_tokens_details.cached_tokens < num_prompt // 2
    assert again.usage.prompt_tokens_details.cached_tokens >= num_prompt // 2
    assert again.choices[0].message.content == first.choices[0].message.content
    entries = again.choices[0].logprobs.content
    assert len(entries) == 6 and all(e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries).strip() == again.choices[0].message.content.strip()


def test_refusals_have_their_status_and_openais_error_shape(mesh: Mesh) -> None:
    async def run() -> dict[str, openai.APIStatusError]:
        errors: dict[str, openai.APIStatusError] = {}
        attempts = {
            "400": (KEY, {"model": "smollm2", "temperature": -1}),
            "401": ("wrong-key", {"model": "smollm2"}),
            "404": (KEY, {"model": "gpt-4o"}),
            "504": (KEY, {"model": "smollm2", "max_tokens": 400, "extra_headers": {"x-request-timeout-ms": "300"},
                          "extra_body": {"ignore_eos": True}}),
        }  # fmt: skip
        for name, (key, options) in attempts.items():
            async with sdk(mesh, api_key=key) as client:
                try:
                    await client.chat.completions.create(messages=PARIS, **options)  # type: ignore[call-overload]
                except openai.APIStatusError as e:
                    errors[name] = e
        return errors

    errors = asyncio.run(run())
    assert {name: e.status_code for name, e in errors.items()} == {"400": 400, "401": 401, "404": 404, "504": 504}
    assert isinstance(errors["400"], openai.BadRequestError) and errors["400"].body["param"] == "temperature"
    assert isinstance(errors["401"], openai.AuthenticationError)
    assert isinstance(errors["404"], openai.NotFoundError) and errors["404"].body["code"] == "model_not_found"
    for e in errors.values():
        assert set(e.body) == {"message", "type", "param", "code"} and "Traceback" not in e.message


def test_a_client_that_leaves_mid_stream_frees_its_blocks_on_both_workers(mesh: Mesh) -> None:
    prompt = token_prompts([150], seed=5)[0]  # handed off: blocks on the prefill and the decode worker

    async def run() -> Any:
        async with sdk(mesh) as client:
            stream = await client.completions.create(
                model="smollm2", prompt=prompt, max_tokens=400, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            received = 0
            async for _ in stream:
                received += 1
                if received == 5:
                    break
            await stream.close()
        async with AsyncClient(mesh.target) as grpc_client:
            return await settled(grpc_client)

    state = asyncio.run(run())
    assert all_free(state), [(w.worker_id, w.num_kv_blocks_free, w.num_running_requests) for w in state.workers]


def test_50_concurrent_streams_each_get_the_grpc_doors_answer(mesh: Mesh) -> None:
    rng = random.Random(50)
    prompts = token_prompts([rng.randrange(4, 48) for _ in range(50)], seed=50)  # some handed off

    async def one(client: openai.AsyncOpenAI, prompt: list[int]) -> tuple[str, int]:
        stream = await client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        usage = chunks[-1].usage
        assert usage is not None and chunks[-2].choices[0].finish_reason == "length"
        return "".join(c.choices[0].text for c in chunks if c.choices), usage.completion_tokens

    async def run() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        async with sdk(mesh) as client:
            http = await asyncio.gather(*(one(client, p) for p in prompts))
        grpc = await asyncio.gather(*(grpc_text(mesh, p, 6) for p in prompts))
        return list(http), list(grpc)

    http, grpc = asyncio.run(run())
    assert http == grpc
