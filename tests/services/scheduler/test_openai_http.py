"""The OpenAI HTTP door against scripted workers, through the real openai SDK and plain httpx:
the same path as the gRPC door (tokens, usage, placement), its answers' shapes, cancellation by a
client that leaves, deadlines, and every refusal with its HTTP status and OpenAI's error shape.

Scripted workers make the refusals that need a full or absent mesh (429, 503) cheap and exact;
tests/mesh/test_openai_mesh.py runs the door over a real SmolLM2 mesh.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest
from scheduler_mesh import Mesh, MeshFactory, eventually
from scripted_workers import expected_tokens

from engine.tokenizer import Tokenizer
from pdmesh.client import AsyncClient
from pdmesh.config import ChannelConfig


def sdk(mesh: Mesh, api_key: str = "none", **options: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mesh.http_url}/v1", api_key=api_key, max_retries=0, **options)  # type: ignore[arg-type]


def texts(num_prompt: int, max_tokens: int) -> str:
    """What the scripted workers write for tokens at positions num_prompt.. (one `<pos>` each)."""
    return "".join(f"<{num_prompt + i}>" for i in range(max_tokens))


async def test_a_completion_streams_the_grpc_doors_tokens_with_usage(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    prompt = list(range(1, 101))  # long enough to be handed off: prefill worker, then decode worker

    async with sdk(mesh) as client:
        stream = await client.completions.create(
            model=mesh.model, prompt=prompt, max_tokens=5, seed=9, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]

    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == texts(100, 5)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (100, 5, 105)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    grpc_tokens = [t async for c in mesh.client.generate(prompt, max_tokens=5, seed=9) for t in c.token_ids]
    assert grpc_tokens == expected_tokens(9, 100, 5)
    decode = mesh.decode_servicer()
    assert [g.sampling.seed for g in decode.generates] == [9, 9]  # both doors sent the same request


async def test_a_chat_answer_whole_and_the_chat_template(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with sdk(mesh) as client:
        answer = await client.chat.completions.create(
            model=mesh.model, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
            extra_headers={"x-request-id": "chat-1"},
        )  # fmt: skip

    tokenizer = Tokenizer.from_model(mesh.model)
    num_prompt = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])))
    assert answer.id == "chatcmpl-chat-1" and answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == texts(num_prompt, 3)
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (num_prompt, 3)
    assert list(mesh.decode_servicer().generates[0].prompt_token_ids) == tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    )
    assert answer.choices[0].finish_reason == "length"
    request = mesh.decode_servicer().generates[0]
    assert request.sampling.temperature == 0.0 and request.sampling.max_tokens == 3


async def test_max_tokens_unset_fills_the_context(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        reply = await http.post("/v1/completions", json={"prompt": [1, 2, 3], "temperature": 0, "seed": 1})

    assert reply.status_code == 200, reply.text
    request = mesh.decode_servicer().generates[0]
    assert request.sampling.max_tokens == 512 - 3  # the scripted workers' context length, less the prompt
    assert request.sampling.temperature == 0.0


async def test_sampling_fields_reach_the_workers(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    body = {
        "prompt": "abc", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "repetition_penalty": 1.2, "seed": 4, "stop": ["x", "y"], "stop_token_ids": [7], "ignore_eos": True,
        "logprobs": 0, "frequency_penalty": 0, "presence_penalty": 0, "n": 1, "user": "u", "unknown_extra": 1,
    }  # fmt: skip

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        reply = await http.post("/v1/completions", json=body)

    assert reply.status_code == 200, reply.text
    s = mesh.decode_servicer().generates[0].sampling
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop), list(s.stop_token_ids)) == (2, 5, 4, ["x", "y"], [7])
    assert s.temperature == pytest.approx(0.7) and s.top_p == pytest.approx(0.9) and s.min_p == pytest.approx(0.1)
    assert s.repetition_penalty == pytest.approx(1.2) and s.ignore_eos and s.logprobs


async def test_a_ttft_target_in_a_header_bounds_the_wait_for_blocks(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, queue_timeout_ms=30_000)
    mesh.decode_servicer().full = True

    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=60) as http:
        started = time.monotonic()
        reply = await http.post(
            "/v1/completions", json={"prompt": list(range(1, 101)), "max_tokens": 2}, headers={"x-slo-ttft-ms": "300"}
        )
        waited = time.monotonic() - started

    assert reply.status_code == 429
    assert waited < 10  # the target's 300 ms, not the 30 s queue timeout


async def test_a_client_that_disconnects_mid_stream_cancels_the_request(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    decode = mesh.decode_servicer()
    decode.token_delay_s = 0.05

    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=10) as http:
        body = {"prompt": list(range(1, 101)), "max_tokens": 300, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            assert reply.status_code == 200
            events = (line async for line in reply.aiter_lines() if line.startswith("data:"))
            await anext(events)  # the first token, from the prefill worker
            await anext(events)  # one from the decode stream
            # leaving the block closes the connection mid-stream

    await eventually(decode.cancelled.is_set, what="the decode stream cancelled")
    await eventually(lambda: decode.running == 0 and not decode.held, what="nothing held")


async def test_a_client_that_disconnects_while_waiting_cancels_the_prefill(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    prefill, decode = mesh.prefill_servicer(), mesh.decode_servicer()
    prefill.hang = True

    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=10) as http:
        post = asyncio.create_task(http.post("/v1/completions", json={"prompt": list(range(1, 101))}))
        await eventually(prefill.started.is_set, what="the prefill started")
        post.cancel()  # the client goes away before any token
        with pytest.raises(asyncio.CancelledError):
            await post

    await eventually(prefill.cancelled.is_set, what="the prefill cancelled")
    await eventually(lambda: not decode.held and len(decode.releases) == 1, what="the ticket released")


async def test_a_deadline_is_504_and_cancels_downstream(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    prefill = mesh.prefill_servicer()
    prefill.hang = True

    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=10) as http:
        reply = await http.post(
            "/v1/completions", json={"prompt": list(range(1, 101))}, headers={"x-request-timeout-ms": "300"}
        )

    assert reply.status_code == 504
    error = reply.json()["error"]
    assert error["param"] == "deadline" and error["type"] == "timeout_error"
    assert prefill.time_remaining[0] is not None and prefill.time_remaining[0] <= 0.3
    await eventually(prefill.cancelled.is_set, what="the prefill cancelled")


async def test_a_deadline_mid_stream_ends_the_stream_with_an_error_event(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, http={"request_timeout_s": 0.5})
    mesh.decode_servicer().token_delay_s = 0.05

    async with sdk(mesh) as client:
        stream = await client.completions.create(model=mesh.model, prompt="x" * 100, max_tokens=300, stream=True)
        with pytest.raises(openai.APIError) as err:
            async for _ in stream:
                pass

    assert "deadline" in err.value.message
    await eventually(mesh.decode_servicer().cancelled.is_set, what="the decode stream cancelled")


async def test_every_decode_worker_full_is_429_with_retry_after(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, queue_timeout_ms=200)
    mesh.decode_servicer().full = True

    async with sdk(mesh) as client:
        with pytest.raises(openai.RateLimitError) as err:
            await client.completions.create(model=mesh.model, prompt=list(range(1, 101)), max_tokens=2, stream=True)

    assert err.value.status_code == 429
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert err.value.body["type"] == "rate_limit_error"  # type: ignore[index]


async def test_no_decode_worker_is_503_and_not_ready(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=0)

    async with sdk(mesh) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model=mesh.model, messages=[{"role": "user", "content": "hi"}])
    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        ready, health = await http.get("/ready"), await http.get("/health")

    assert err.value.status_code == 503
    assert ready.status_code == 503 and ready.json()["decode_workers"] == 0 and ready.json()["prefill_workers"] == 1
    assert health.status_code == 200


async def test_ready_and_models(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with sdk(mesh) as client:
        models = await client.models.list()
        one = await client.models.retrieve(mesh.model)
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such-model")
    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        ready = await http.get("/ready")

    assert [m.id for m in models.data] == [mesh.model] and one.id == mesh.model
    assert models.data[0].model_extra == {"max_model_len": 512}
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


BAD = [
    pytest.param({"prompt": [1], "temperature": -1}, "temperature", id="temperature"),
    pytest.param({"prompt": [1], "temperature": "hot"}, "temperature", id="temperature-type"),
    pytest.param({"prompt": [1], "top_p": 0}, "top_p", id="top_p"),
    pytest.param({"prompt": [1], "max_tokens": 0}, "max_tokens", id="max_tokens"),
    pytest.param({"prompt": [1], "max_tokens": 600}, "max_tokens", id="over-context"),
    pytest.param({"prompt": [1], "n": 2}, "n", id="n"),
    pytest.param({"prompt": [1], "frequency_penalty": 0.5}, "frequency_penalty", id="frequency_penalty"),
    pytest.param({"prompt": [1], "logprobs": 3}, "logprobs", id="top-logprobs"),
    pytest.param({"prompt": [1], "echo": True}, "echo", id="echo"),
    pytest.param({"prompt": [1], "stop": 5}, "stop", id="stop-type"),
    pytest.param({"prompt": ""}, "prompt", id="empty-prompt"),
    pytest.param({"prompt": []}, "prompt", id="no-tokens"),
    pytest.param({"prompt": [1, 99999]}, "prompt", id="token-outside-vocab"),
    pytest.param({"prompt": ["a", "b"]}, "prompt", id="batch"),
    pytest.param({}, "prompt", id="no-prompt"),
    pytest.param({"prompt": [1], "x-seed": 1, "seed": -1}, "seed", id="seed"),
    pytest.param({"prompt": [1], "priority": "urgent"}, "priority", id="priority"),
    pytest.param({"prompt": [1], "slo": {"ttft_ms": -1}}, "slo.ttft_ms", id="slo"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
async def test_a_bad_completion_is_400_naming_the_field(mesh_factory: MeshFactory, body: dict, param: str) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        reply = await http.post("/v1/completions", json=body)

    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) and "Traceback" not in reply.text
    assert mesh.decode_servicer().reserves == mesh.decode_servicer().generates == []


CHAT_BAD = [
    pytest.param({"messages": []}, "messages", id="no-messages"),
    pytest.param({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", id="role"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]",
                 id="image"),  # fmt: skip
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools",
                 id="tools"),  # fmt: skip
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", id="top"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_tokens",
                 id="max_completion_tokens"),  # fmt: skip
]


@pytest.mark.parametrize(("body", "param"), CHAT_BAD)
async def test_a_bad_chat_is_400_naming_the_field(mesh_factory: MeshFactory, body: dict, param: str) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        reply = await http.post("/v1/chat/completions", json=body)

    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text


async def test_a_prompt_over_max_prompt_bytes_is_400_as_over_grpc(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1, max_prompt_bytes=100)
    messages = [{"role": "user", "content": "y" * 60}, {"role": "user", "content": "z" * 41}]

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        text = await http.post("/v1/completions", json={"prompt": "x" * 101})
        chat = await http.post("/v1/chat/completions", json={"messages": messages})
        fits = await http.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 1})

    assert (text.status_code, text.json()["error"]["param"]) == (400, "prompt")
    assert (chat.status_code, chat.json()["error"]["param"]) == (400, "messages")
    assert "over the scheduler's limit of 100 (max_prompt_bytes)" in text.json()["error"]["message"]
    assert fits.status_code == 200, fits.text


async def test_malformed_bodies_unknown_models_and_routes(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        json_header = {"content-type": "application/json"}
        not_json = await http.post("/v1/completions", content=b"{not json", headers=json_header)
        model = await http.post("/v1/completions", json={"prompt": [1], "model": "gpt-4"})
        route = await http.get("/v1/nothing")
        too_big = await http.post("/v1/completions", content=b"x" * (65 << 20))

    assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "body"
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"
    assert route.status_code == 404 and "error" in route.json()
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "body"


async def test_one_api_keys_setting_guards_both_doors(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1, api_keys=("k1",))  # PDMESH_API_KEYS

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        bare = await http.post("/v1/completions", json={"prompt": [1], "max_tokens": 1})
        keyed = await http.post("/v1/completions", json={"prompt": [1], "max_tokens": 1},
                                headers={"Authorization": "Bearer k1"})  # fmt: skip
    async with AsyncClient(mesh.target, ChannelConfig()) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.list_models()

    assert (bare.status_code, keyed.status_code) == (401, 200)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_api_keys_are_required_when_configured(mesh_factory: MeshFactory) -> None:
    # The deprecated PDMESH_HTTP_API_KEYS: keys of the HTTP door alone.
    mesh = await mesh_factory(prefill=1, decode=1, http={"api_keys": ("k1", "k2")})

    async with sdk(mesh, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError) as err:
            await client.models.list()
    async with sdk(mesh, api_key="k2") as client:
        models = await client.models.list()
    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        bare = await http.post("/v1/completions", json={"prompt": [1]})
        ready = await http.get("/ready")
    async with AsyncClient(mesh.target, ChannelConfig()) as client:
        assert [m.name for m in await client.list_models()] == [mesh.model]  # the gRPC door asks none

    assert err.value.status_code == 401 and err.value.response.headers["www-authenticate"] == "Bearer"
    assert [m.id for m in models.data] == [mesh.model]
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    assert ready.status_code == 200  # probes need no key


async def test_a_raw_chat_stream(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True, "logprobs": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            events = [line.removeprefix("data: ") async for line in reply.aiter_lines() if line.startswith("data:")]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert len({c["id"] for c in chunks}) == 1
    assert mesh.decode_servicer().generates[0].sampling.logprobs  # asked of the workers (values: the mesh test)


async def test_continuous_usage_counts_every_chunks_tokens(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        body = {"prompt": [1, 2, 3], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            events = [line.removeprefix("data: ") async for line in reply.aiter_lines() if line.startswith("data:")]

    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 4]  # the last: the usage chunk
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
