"""The KV store in a real mesh: a multi-turn conversation whose later turns compute only their new
tokens, whichever prefill worker they land on, with the tokens the engine gives alone.

Two prefill workers take the turns in turn (round_robin), so every turn lands on the worker that
did not compute the previous one: what it reuses comes from its own cache (the turn before last)
and from the store (everything since, the decode worker's output included).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdmesh.client import AsyncClient, Completion, KVStoreState
from pdmesh.enums import ExecutionPlan
from tests.engine.conftest import save_tiny_model
from tests.mesh.conftest import BLOCK_SIZE, start_mesh, stop_mesh
from tests.mesh.test_mesh import prompts_of

pytestmark = pytest.mark.slow
ROUND_ROBIN = {"PDMESH_SCHEDULER_POLICY": "ROUND_ROBIN", "PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS": "0"}
OUTPUT = 20


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mesh tests' model with the tokenizer's vocabulary, so that outputs can go back in as prompts."""
    return save_tiny_model(tmp_path_factory.mktemp("chat_model"), max_position_embeddings=4096, seed=7, vocab_size=258)


@pytest.fixture(scope="module")
def mesh(chat_model: Path):
    m = start_mesh(chat_model, 2, 1, env=ROUND_ROBIN)
    yield m
    stop_mesh(m)


async def complete(client: AsyncClient, prompt: list[int]) -> Completion:
    chunks = [c async for c in client.generate(prompt, max_tokens=OUTPUT, ignore_eos=True, timeout_s=120)]
    return Completion.collect(chunks)


async def store_holds(client: AsyncClient, blocks: int, timeout_s: float = 30) -> KVStoreState:
    """The store's state once it has stored `blocks` blocks in all (the offers land after each turn)."""
    deadline = time.monotonic() + timeout_s
    while True:
        (store,) = (await client.cluster_state()).kv_stores
        if store.num_stored_blocks >= blocks or time.monotonic() > deadline:
            return store
        await asyncio.sleep(0.1)


def reference_conversation(model: Path, turns: list[list[int]]) -> list[list[int]]:
    """The engine alone, each turn's prompt being the conversation so far plus the new message."""
    from tests.mesh.conftest import engine_greedy

    history: list[int] = []
    outputs = []
    for new in turns:
        (out,) = engine_greedy(model, [history + new], OUTPUT)
        history = history + new + out
        outputs.append(out)
    return outputs


def test_each_turn_computes_only_its_new_tokens_on_either_prefill_worker(mesh, chat_model: Path) -> None:
    turns = prompts_of([200, 30, 26], seed=11)

    async def run() -> tuple[list[Completion], list[int], KVStoreState]:
        completions: list[Completion] = []
        history: list[int] = []
        lengths = []
        async with AsyncClient(mesh.target) as client:
            for new in turns:
                prompt = history + new
                lengths.append(len(prompt))
                completions.append(await complete(client, prompt))
                history = prompt + list(completions[-1].token_ids)
                # the prefill worker's prompt blocks and the decode worker's output blocks
                await store_holds(client, (len(history) - 1) // BLOCK_SIZE)
            return completions, lengths, await store_holds(client, 0)

    completions, lengths, store = asyncio.run(run())

    assert [list(c.token_ids) for c in completions] == reference_conversation(chat_model, turns)
    prefill_workers = [c.placement.prefill_worker_id for c in completions if c.placement is not None]
    assert prefill_workers[0] != prefill_workers[1] and prefill_workers[0] == prefill_workers[2]
    usages = [c.usage for c in completions]
    assert all(u is not None and c.placement.plan is ExecutionPlan.DISAGGREGATED  # type: ignore[union-attr]
               for u, c in zip(usages, completions, strict=True))  # fmt: skip

    # Turn 1: nothing to reuse. Turns 2 and 3: every full block of the conversation so far (the
    # last output token was never computed), so only the new tokens and the tail of a block are.
    u1, u2, u3 = usages
    assert u1 is not None and u2 is not None and u3 is not None
    assert (u1.cached_prompt_tokens, u1.computed_prompt_tokens, u1.transferred_prompt_tokens) == (0, 200, 200)
    reused = [(lengths[i - 1] + OUTPUT - 1) // BLOCK_SIZE * BLOCK_SIZE for i in (1, 2)]
    assert (u2.worker_cached_prompt_tokens, u2.store_cached_prompt_tokens) == (0, reused[0])  # the other worker
    assert u2.computed_prompt_tokens == lengths[1] - reused[0] <= 30 + BLOCK_SIZE
    # Turn 3 is back on turn 1's worker: turn 1's prompt from its own cache, the rest from the store.
    assert (u3.worker_cached_prompt_tokens, u3.store_cached_prompt_tokens) == (200, reused[1] - 200)
    assert u3.computed_prompt_tokens == lengths[2] - reused[1] <= 26 + BLOCK_SIZE
    assert u3.cached_prompt_tokens + u3.computed_prompt_tokens == u3.prompt_tokens == lengths[2]
    assert (store.num_fetches, store.num_fetches_refused, store.num_fetches_failed) == (2, 0, 0)
    assert store.memory_used_bytes <= store.memory_capacity_bytes

    # What an operator sees: `pdmesh status` shows the store, its use and its hits.
    shown = subprocess.run([sys.executable, "-m", "pdmesh", "status", "--target", mesh.target],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "kv store  kvstore-0" in shown and "fetches   2 (" in shown and "refused" in shown
    as_json = json.loads(subprocess.run([sys.executable, "-m", "pdmesh", "status", "--target", mesh.target, "--json"],
                                        capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert as_json["kv_stores"][0]["num_fetches"] == 2 and as_json["kv_stores"][0]["health"] == "serving"
