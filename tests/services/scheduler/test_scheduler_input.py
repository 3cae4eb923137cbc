"""Requests the scheduler refuses: each gets its status code and a message naming the field, no
worker is bothered, no traceback leaks, and the requests around it go on undisturbed."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from scheduler_mesh import MeshFactory
from scripted_workers import MAX_MODEL_LEN, expected_tokens

from pdmesh.v1 import common_pb2, scheduler_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def ids(n: int) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[7] * n))


def request(prompt: common_pb2.Prompt | None = None, model: str = "", **sampling: Any) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        model=model, prompt=prompt if prompt is not None else ids(3), sampling=common_pb2.SamplingParams(**sampling)
    )


def chat(*roles: int) -> common_pb2.Prompt:
    messages = [common_pb2.ChatMessage(role=r, content="hi") for r in roles]  # type: ignore[arg-type]
    return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=messages))


BAD = [
    pytest.param(request(common_pb2.Prompt(text="")), INVALID, "prompt", id="empty-text"),
    pytest.param(scheduler_pb2.GenerateRequest(), INVALID, "prompt", id="no-prompt"),
    pytest.param(request(ids(0)), INVALID, "prompt", id="no-token-ids"),
    pytest.param(
        request(common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 2, 99999]))),
        INVALID,
        "prompt",
        id="token-outside-vocab",
    ),
    pytest.param(request(chat()), INVALID, "prompt", id="chat-without-messages"),
    pytest.param(
        request(chat(common_pb2.CHAT_ROLE_USER, common_pb2.CHAT_ROLE_UNSPECIFIED)), INVALID, "role", id="chat-role"
    ),
    pytest.param(request(temperature=-1.0), INVALID, "temperature", id="temperature"),
    pytest.param(request(top_p=0.0), INVALID, "top_p", id="top_p"),
    pytest.param(request(top_p=1.5), INVALID, "top_p", id="top_p-above-1"),
    pytest.param(request(min_p=2.0), INVALID, "min_p", id="min_p"),
    pytest.param(request(max_tokens=0), INVALID, "max_tokens", id="max_tokens-zero"),
    pytest.param(request(repetition_penalty=0.0), INVALID, "repetition_penalty", id="repetition_penalty"),
    pytest.param(request(stop=[""]), INVALID, "stop", id="empty-stop-string"),
    pytest.param(request(stop_token_ids=[99999]), INVALID, "stop_token_ids", id="stop-token-outside-vocab"),
    pytest.param(request(ids(MAX_MODEL_LEN - 10), max_tokens=20), INVALID, "max_tokens", id="over-context"),
    pytest.param(request(ids(MAX_MODEL_LEN + 1), max_tokens=1), INVALID, "prompt", id="prompt-over-context"),
    pytest.param(request(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "model", id="unknown-model"),
]


@pytest.mark.parametrize(("bad", "code", "field"), BAD)
async def test_a_bad_request_gets_its_code_and_names_the_field(
    mesh_factory: MeshFactory, bad: scheduler_pb2.GenerateRequest, code: grpc.StatusCode, field: str
) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in mesh.stub.Generate(bad, timeout=5):
            pass

    assert err.value.code() == code
    details = err.value.details() or ""
    assert field in details, details
    assert "Traceback" not in details and "internal error" not in details
    decode, prefill = mesh.decode_servicer(), mesh.prefill_servicer()
    assert decode.reserves == decode.generates == [] and prefill.calls == []
    # ... and the next request is served as if nothing happened.
    chunks = [c async for c in mesh.client.generate([1, 2, 3], max_tokens=2, seed=6)]
    assert [t for c in chunks for t in c.token_ids] == expected_tokens(6, 3, 2)


async def test_a_bad_request_does_not_disturb_a_stream_in_flight(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    mesh.decode_servicer().token_delay_s = 0.01

    async def good() -> list[int]:
        return [t async for c in mesh.client.generate(list(range(1, 101)), max_tokens=30, seed=3) for t in c.token_ids]

    async def bad() -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in mesh.stub.Generate(request(temperature=-5.0)):
                pass
        return err.value.code()

    stream = asyncio.create_task(good())
    codes = await asyncio.gather(*(bad() for _ in range(5)))
    assert codes == [INVALID] * 5
    assert await stream == expected_tokens(3, 100, 30)


async def test_no_live_worker_is_unavailable(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=0)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in mesh.client.generate([1, 2, 3], max_tokens=2):
            pass

    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in (err.value.details() or "")


async def test_only_prefill_workers_is_unavailable(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=0)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in mesh.client.generate(list(range(1, 101)), max_tokens=2):
            pass

    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mesh.prefill_servicer().calls == []


async def test_every_decode_worker_full_is_resource_exhausted(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=2, queue_timeout_ms=200)
    for i in range(2):
        mesh.decode_servicer(i).full = True

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in mesh.client.generate(list(range(1, 101)), max_tokens=2, timeout_s=10):
            pass

    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert mesh.decode_servicer(0).reserves and mesh.decode_servicer(1).reserves  # both were asked
    assert mesh.prefill_servicer().calls == []
