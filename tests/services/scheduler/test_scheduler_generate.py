"""A request's way through the scheduler when every worker behaves.

Long prompts are handed off (Reserve -> Prefill with the ticket -> Decode.Generate committing it)
and their first token comes from the prefill worker; short ones are prefilled by the decode
worker itself; text and chat prompts reach the workers tokenized as the model expects; the last
response carries usage and placement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scheduler_mesh import MeshFactory, eventually
from scripted_workers import expected_tokens, token_at

from engine.tokenizer import Tokenizer
from pdmesh.client import AsyncClient, Chunk, ExecutionPlan, FinishReason, PromptInput
from pdmesh.v1 import decode_pb2

LONG = list(range(1, 101))  # 100 uncached tokens: above the local-prefill threshold
SHORT = [5, 6, 7]


async def collect(client: AsyncClient, prompt: PromptInput, **options: Any) -> list[Chunk]:
    return [chunk async for chunk in client.generate(prompt, **options)]


def tokens_of(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_a_long_prompt_is_handed_off_first_token_from_prefill_rest_from_decode(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    prefill, decode = mesh.prefill_servicer(), mesh.decode_servicer()

    chunks = await collect(mesh.client, LONG, max_tokens=6, seed=1234)

    # The client sees the whole continuation, in order, each token once.
    assert tokens_of(chunks) == expected_tokens(1234, len(LONG), 6)
    assert "".join(c.text for c in chunks) == "".join(f"<{100 + i}>" for i in range(6))
    # The first response is the prefill worker's token alone (that is the TTFT).
    assert chunks[0].token_ids == (token_at(1234, 100),)
    # The transaction: Reserve for the prompt, Prefill into that ticket, Generate commits it.
    [reserve] = decode.reserves
    assert reserve.num_tokens == len(LONG) and reserve.lease_ms > 0
    [prefill_call] = prefill.calls
    assert list(prefill_call.prompt_token_ids) == LONG
    assert prefill_call.ticket.ticket_id == "decode-0/t1"
    assert prefill_call.sampling.seed == 1234 and prefill_call.sampling.max_tokens == 6
    [generate] = decode.generates
    assert generate.WhichOneof("kv_source") == "ticket_id" and generate.ticket_id == "decode-0/t1"
    assert list(generate.prompt_token_ids) == LONG
    assert list(generate.output_token_ids) == [token_at(1234, 100)]
    assert generate.sampling.seed == 1234 and generate.sampling.max_tokens == 6
    assert decode.releases == [] and decode.held == set()
    # Finish, usage and placement ride on the last response only.
    assert all(c.usage is None and c.placement is None and c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert last.placement is not None
    assert last.placement.plan is ExecutionPlan.DISAGGREGATED
    assert (last.placement.prefill_worker_id, last.placement.decode_worker_id) == ("prefill-0", "decode-0")
    assert last.placement.num_decode_failovers == 0
    usage = last.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (100, 6)
    assert (usage.cached_prompt_tokens, usage.transfer_bytes, usage.prefill_ms) == (16, 4096, 7.0)
    assert 0 < usage.ttft_ms <= usage.e2e_ms


async def test_a_short_prompt_is_prefilled_on_the_decode_worker(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    prefill, decode = mesh.prefill_servicer(), mesh.decode_servicer()

    chunks = await collect(mesh.client, SHORT, max_tokens=4, seed=7)

    assert tokens_of(chunks) == expected_tokens(7, len(SHORT), 4)
    assert prefill.calls == [] and decode.reserves == []
    [generate] = decode.generates
    assert generate.WhichOneof("kv_source") == "local_prefill"
    assert list(generate.prompt_token_ids) == SHORT and list(generate.output_token_ids) == []
    placement = chunks[-1].placement
    assert placement is not None and placement.plan is ExecutionPlan.LOCAL_PREFILL
    assert (placement.prefill_worker_id, placement.decode_worker_id) == ("", "decode-0")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_without_prefill_workers_every_prompt_is_prefilled_locally(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1)

    chunks = await collect(mesh.client, LONG, max_tokens=3, seed=3)

    assert tokens_of(chunks) == expected_tokens(3, len(LONG), 3)
    assert chunks[-1].placement is not None and chunks[-1].placement.plan is ExecutionPlan.LOCAL_PREFILL


async def test_the_scheduler_picks_one_seed_for_every_worker_when_the_client_gives_none(
    mesh_factory: MeshFactory,
) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    prefill, decode = mesh.prefill_servicer(), mesh.decode_servicer()

    chunks = await collect(mesh.client, LONG, max_tokens=3)

    [prefill_call], [generate] = prefill.calls, decode.generates
    assert prefill_call.sampling.HasField("seed") and generate.sampling.HasField("seed")
    seed = generate.sampling.seed
    assert prefill_call.sampling.seed == seed
    assert tokens_of(chunks) == expected_tokens(seed, len(LONG), 3)


async def test_a_generation_that_ends_at_its_first_token_releases_the_ticket(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=1, decode=1)
    decode = mesh.decode_servicer()

    chunks = await collect(mesh.client, LONG, max_tokens=1, seed=5)

    assert tokens_of(chunks) == [token_at(5, 100)]
    assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].usage is not None
    assert decode.generates == []
    await eventually(lambda: decode.releases == ["decode-0/t1"], what="Release of the unused ticket")
    assert decode.held == set()


async def test_text_and_chat_prompts_reach_the_workers_tokenized(
    mesh_factory: MeshFactory, tokenizer_dir: Path
) -> None:
    mesh = await mesh_factory(prefill=0, decode=1)
    decode = mesh.decode_servicer()
    tokenizer = Tokenizer.from_model(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]

    await collect(mesh.client, "hello world", max_tokens=2)
    await collect(mesh.client, messages, max_tokens=2)

    text_call, chat_call = decode.generates
    assert list(text_call.prompt_token_ids) == tokenizer.encode("hello world", add_special_tokens=True)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.endswith("<s>assistant: ")
    assert list(chat_call.prompt_token_ids) == tokenizer.encode(rendered)
    assert list(chat_call.prompt_token_ids).count(256) == 3  # <s> written in the template is one token



async def test_a_text_prompt_starts_with_bos_when_the_model_expects_one(
    mesh_factory: MeshFactory, bos_tokenizer_dir: Path
) -> None:
    mesh = await mesh_factory(prefill=0, decode=1, model=bos_tokenizer_dir)

    await collect(mesh.client, "hi", max_tokens=2)

    [generate] = mesh.decode_servicer().generates
    plain = Tokenizer.from_model(str(bos_tokenizer_dir)).encode("hi")  # without special tokens
    assert len(plain) == 2 and list(generate.prompt_token_ids) == [256, *plain]


async def test_token_id_prompts_are_used_as_they_are(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(prefill=0, decode=1)

    await collect(mesh.client, [256, 1, 2, 257], max_tokens=2)

    [generate] = mesh.decode_servicer().generates
    assert list(generate.prompt_token_ids) == [256, 1, 2, 257]
    assert isinstance(generate, decode_pb2.DecodeGenerateRequest)
