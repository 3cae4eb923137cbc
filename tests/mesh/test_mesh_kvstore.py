"""The KV store in a real mesh: a multi-turn conversation whose later turns compute only their new
tokens, whichever prefill worker they land on, with the tokens the engine gives alone; a decode
worker that fails over fetches the prompt from the store; a store SIGKILLed in the middle of a
fetch costs the request nothing but the fetch, and once started again it serves again; a store
slower than computing the prompt is measured once and then left alone.

Two prefill workers take the turns in turn (round_robin), so every turn lands on the worker that
did not compute the previous one: what it reuses comes from its own cache (the turn before last)
and from the store (everything since, the decode worker's output included). The store is the
real one, run by the test (tests/mesh/stalling_store.py) so that a test can stall its next fetch
and kill it there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.client import AsyncClient, Completion, KVStoreState, WorkerHealth
from pdmesh.enums import ExecutionPlan, WorkerRole
from pdmesh.up import KVSTORE_ID, Mesh
from tests.engine.conftest import save_tiny_model
from tests.mesh.conftest import BLOCK_SIZE, engine_greedy, start_mesh, stop_mesh
from tests.mesh.test_mesh import prompts_of

pytestmark = pytest.mark.slow
# Every hit fetched (the tests check the store's data path), but in the last test, where the
# workers fetch only what is predicted faster than computing it.
ROUND_ROBIN = {
    "PDMESH_SCHEDULER_POLICY": "ROUND_ROBIN", "PDMESH_SCHEDULER_LOCAL_PREFILL_MAX_TOKENS": "0",
    "PDMESH_WORKER_KVSTORE_FETCH": "always",
}  # fmt: skip
OUTPUT = 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mesh tests' model with the tokenizer's vocabulary, so that outputs can go back in as prompts."""
    return save_tiny_model(tmp_path_factory.mktemp("chat_model"), max_position_embeddings=4096, seed=7, vocab_size=258)


@dataclass
class Store:
    """The mesh's KV store, a process of the test's: stalled on its next fetch once armed."""

    mesh: Mesh
    control: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> None:
        port = self.mesh.spec.kvstore_port
        argv = [
            sys.executable, str(ROOT / "tests/mesh/stalling_store.py"), str(self.control), "serve", "kvstore",
            "--host", "127.0.0.1", "--port", str(port), "--kv-port", str(port + 100), "--worker-id", KVSTORE_ID,
            "--advertise-host", "127.0.0.1", "--scheduler", self.mesh.target, "--memory-mib", "64",
        ]  # fmt: skip
        since_ms = time.time() * 1000
        env = {**os.environ, **dict(self.mesh.spec.env), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env)
        asyncio.run(self._serving(since_ms, timeout_s))

    async def _serving(self, since_ms: float, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with AsyncClient(self.mesh.target) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, "the store exited"
                stores = (await client.cluster_state()).kv_stores
                if any(s.health is WorkerHealth.SERVING and s.last_report_unix_ms > since_ms for s in stores):
                    await asyncio.sleep(1.0)  # the workers hear of it in their next reports' answers
                    return
                await asyncio.sleep(0.1)
        raise TimeoutError("the store did not register")

    def stall_next_fetch(self) -> Path:
        (self.control / "arm").touch()
        return self.control / "fetching"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def mesh(chat_model: Path) -> Iterator[Mesh]:
    m = start_mesh(chat_model, 2, 2, env=ROUND_ROBIN, kvstore=False)
    yield m
    stop_mesh(m)


@pytest.fixture(scope="module")
def store(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(mesh, tmp_path_factory.mktemp("store_control"))
    s.start()
    yield s
    s.kill()


async def complete(client: AsyncClient, prompt: list[int], timeout_s: float = 120) -> Completion:
    chunks = [c async for c in client.generate(prompt, max_tokens=OUTPUT, ignore_eos=True, timeout_s=timeout_s)]
    return Completion.collect(chunks)


async def store_holds(client: AsyncClient, blocks: int, timeout_s: float = 30) -> KVStoreState:
    """The store's state once it has stored `blocks` blocks in all (the offers land after each turn)."""
    deadline = time.monotonic() + timeout_s
    while True:
        (store,) = (await client.cluster_state()).kv_stores
        if store.num_stored_blocks >= blocks or time.monotonic() > deadline:
            return store
        await asyncio.sleep(0.1)


async def store_settled(client: AsyncClient, quiet_s: float = 1.0, timeout_s: float = 30) -> int:
    """The store's block count once no offer has landed for `quiet_s`: a turn's offers (prefill and
    decode workers', after the response) land in the background, possibly during the next turn."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while True:
        (store,) = (await client.cluster_state()).kv_stores
        if store.num_stored_blocks != last:
            last, since = store.num_stored_blocks, time.monotonic()
        elif time.monotonic() - since >= quiet_s or time.monotonic() > deadline:
            return last
        await asyncio.sleep(0.1)


async def store_until(client: AsyncClient, done: Callable[[KVStoreState], bool], timeout_s: float = 30) -> KVStoreState:
    """The store's state once `done` says so (its reports come every 100 ms), or at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        (store,) = (await client.cluster_state()).kv_stores
        if done(store) or time.monotonic() > deadline:
            return store
        await asyncio.sleep(0.1)


def reference_conversation(model: Path, turns: list[list[int]]) -> list[list[int]]:
    """The engine alone, each turn's prompt being the conversation so far plus the new message."""
    history: list[int] = []
    outputs = []
    for new in turns:
        (out,) = engine_greedy(model, [history + new], OUTPUT)
        history = history + new + out
        outputs.append(out)
    return outputs


def test_each_turn_computes_only_its_new_tokens_on_either_prefill_worker(mesh, store, chat_model: Path) -> None:
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

    # What an operator sees: `pdmesh status` shows the store, its use and its hits, and its memory
    # shared with the workers of its host (every fetch released its lease, none ran out).
    shown = subprocess.run([sys.executable, "-m", "pdmesh", "status", "--target", mesh.target],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert f"kv store  {KVSTORE_ID}" in shown and "fetches   2 (" in shown and "refused" in shown
    assert "shared    a file the workers of its host map: 0 leases held, 0 ran out" in shown
    as_json = json.loads(subprocess.run([sys.executable, "-m", "pdmesh", "status", "--target", mesh.target, "--json"],
                                        capture_output=True, text=True, check=True).stdout)  # fmt: skip
    (shown_store,) = as_json["kv_stores"]
    assert shown_store["num_fetches"] == 2 and shown_store["health"] == "serving"
    assert (shown_store["shared_memory"], shown_store["num_leases"], shown_store["num_leases_expired"]) == (True, 0, 0)


def test_a_decode_worker_that_fails_over_fetches_the_prompt_from_the_store(mesh, store, chat_model: Path) -> None:
    prompt = prompts_of([60], seed=21)[0]
    expected = engine_greedy(chat_model, [prompt], 1000)[0]

    async def run() -> tuple[list[int], Completion, KVStoreState, KVStoreState, str]:
        async with AsyncClient(mesh.target) as client:
            before = await store_holds(client, 0)
            chunks, killed = [], ""
            async for chunk in client.generate(prompt, max_tokens=1000, ignore_eos=True, timeout_s=120):
                chunks.append(chunk)
                if not killed:
                    # The prefill worker has offered the prompt's 15 blocks; then the decode
                    # worker streaming the request dies.
                    await store_holds(client, before.num_stored_blocks + 60 // BLOCK_SIZE)
                    state = await client.cluster_state()
                    (busy,) = [w for w in state.workers if w.role is WorkerRole.DECODE and w.num_assigned_requests]
                    killed = busy.worker_id
                    mesh.kill(killed)
            after = await store_until(client, lambda s: s.num_fetches > before.num_fetches)
            return [t for c in chunks for t in c.token_ids], Completion.collect(chunks), before, after, killed

    tokens, completion, before, after, killed = asyncio.run(asyncio.wait_for(run(), 180))
    assert tokens == expected
    assert completion.placement is not None and completion.placement.num_decode_failovers == 1
    assert completion.placement.decode_worker_id != killed
    # The other decode worker fetched the prompt's blocks rather than computing them (and computed
    # the tokens streamed before the failure: the dead worker never offered them).
    assert after.num_fetches == before.num_fetches + 1
    assert after.num_fetched_blocks == before.num_fetched_blocks + 60 // BLOCK_SIZE
    # And the Usage says so: the prompt the request finished with came from the store, not from
    # the first plan's prefill (computed there, pushed to the worker that died).
    u = completion.usage
    assert u is not None and (u.store_cached_prompt_tokens, u.worker_cached_prompt_tokens) == (60, 0)
    assert (u.computed_prompt_tokens, u.transferred_prompt_tokens) == (0, 0)
    mesh.restart(killed, timeout_s=120)


def test_the_store_killed_mid_fetch_costs_the_request_only_the_fetch(mesh, store, chat_model: Path) -> None:
    first, new = prompts_of([120, 20], seed=31)
    (out1,) = engine_greedy(chat_model, [first], OUTPUT)
    second = first + out1 + new
    (expected,) = engine_greedy(chat_model, [second], OUTPUT)

    async def run() -> tuple[Completion, float]:
        async with AsyncClient(mesh.target) as client:
            stored = (await store_holds(client, 0)).num_stored_blocks
            assert list((await complete(client, first)).token_ids) == out1
            await store_holds(client, stored + (len(first) + OUTPUT - 1) // BLOCK_SIZE)
            fetching = store.stall_next_fetch()
            started = time.monotonic()
            turn2 = asyncio.create_task(complete(client, second, timeout_s=60))
            while not fetching.exists():  # the store has pinned the blocks and stalls before the push
                assert not turn2.done(), "turn 2 finished without fetching"
                await asyncio.sleep(0.02)
            store.kill()
            completion = await turn2
            return completion, time.monotonic() - started

    completion, took_s = asyncio.run(run())
    assert list(completion.token_ids) == expected and took_s < 60  # within its deadline
    u = completion.usage
    assert u is not None and u.store_cached_prompt_tokens == 0  # computed instead of fetched
    assert u.worker_cached_prompt_tokens + u.computed_prompt_tokens == u.prompt_tokens == len(second)

    # Started again, the store is empty (memory only): the workers use it again, and a new
    # conversation's second turn fetches from it and gives the engine's tokens. The workers set the
    # store aside for a while after the failed fetch (1 s, then 2 s) and learn of the restart from
    # the scheduler: a conversation started before that computes its second turn, so new ones
    # start until one fetches (a fixed 2.5 s wait once fell short on a loaded machine).
    store.start()

    async def after_restart() -> tuple[list[list[int]], list[int], Completion, KVStoreState]:
        async with AsyncClient(mesh.target) as client:
            deadline = time.monotonic() + 60
            for seed in range(32, 1000):
                again = prompts_of([80, 12], seed=seed)
                before = (await store_holds(client, 0)).num_stored_blocks
                out = list((await complete(client, again[0])).token_ids)
                await store_holds(client, before + (len(again[0]) + OUTPUT - 1) // BLOCK_SIZE, timeout_s=10)
                completion = await complete(client, again[0] + out + again[1])
                fetched = completion.usage is not None and completion.usage.store_cached_prompt_tokens > 0
                if fetched or time.monotonic() > deadline:
                    return again, out, completion, await store_until(client, lambda s: s.num_fetches > 0)
            raise AssertionError("unreachable")

    again, out, completion, restarted = asyncio.run(after_restart())
    (expected_out,) = engine_greedy(chat_model, [again[0]], OUTPUT)
    (expected_again,) = engine_greedy(chat_model, [again[0] + out + again[1]], OUTPUT)
    assert out == expected_out
    assert list(completion.token_ids) == expected_again
    assert completion.usage is not None and completion.usage.store_cached_prompt_tokens > 0
    assert (restarted.num_fetches, restarted.num_fetches_refused, restarted.num_fetches_failed) == (1, 0, 0)


def test_a_store_slower_than_computing_is_fetched_from_once_then_computed_instead(
    mesh, store, chat_model: Path
) -> None:
    # The prefill workers again, now fetching only when it pays (no re-probe within the test); the
    # store takes 2 s a fetch.
    for worker in ("prefill-0", "prefill-1"):
        mesh.kill(worker)
        when_faster = (("PDMESH_WORKER_KVSTORE_FETCH", "when_faster"), ("PDMESH_WORKER_KVSTORE_REPROBE_MS", "600000"))
        mesh.restart(worker, timeout_s=120, env=when_faster)
    (store.control / "delay").write_text("2.0")
    warmups = prompts_of([40, 50, 60, 70, 80, 90, 100, 110], seed=41)
    conversations = [prompts_of([150, 20], seed=seed) for seed in (42, 43)]

    async def run() -> list[tuple[Completion, float]]:
        turns = []
        async with AsyncClient(mesh.target) as client:
            for prompt in warmups:  # each worker computes four prompts: its compute cost is measured
                await complete(client, prompt)
            await asyncio.sleep(1.0)  # their steps reach the workers' policies with a load report
            for first, new in conversations:  # turn 1 on one worker, turn 2 on the other
                stored = await store_settled(client)  # the last turn's offers may still be landing
                out = await complete(client, first)
                await store_holds(client, stored + (len(first) + OUTPUT - 1) // BLOCK_SIZE)
                started = time.monotonic()
                turns.append((await complete(client, first + list(out.token_ids) + new), time.monotonic() - started))
        return turns

    try:
        (learned, learned_s), (computed, computed_s) = asyncio.run(run())
    finally:
        (store.control / "delay").unlink()
    assert learned.placement is not None and computed.placement is not None
    assert learned.placement.prefill_worker_id == computed.placement.prefill_worker_id
    # The first fetch from the store measures it (2 s for a dozen blocks) ...
    assert learned.usage is not None and learned.usage.store_cached_prompt_tokens > 0 and learned_s >= 2.0
    # ... and the next prompt it holds is computed instead: nothing from the store, no wait for it.
    u = computed.usage
    assert u is not None and (u.store_cached_prompt_tokens, u.worker_cached_prompt_tokens) == (0, 0)
    assert u.computed_prompt_tokens == u.prompt_tokens and computed_s < 2.0
    worker = learned.placement.prefill_worker_id
    offset = dict(mesh.spec.metrics_ports())[worker]
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh.spec.port + 200 + offset}/metrics", timeout=10).read()
    samples = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    assert samples["pdmesh:worker_kvstore_fetches_skipped_total"] == 1
    assert samples["pdmesh:worker_kvstore_fetches_total"] == 1
    held = (len(conversations[1][0]) + OUTPUT - 1) // BLOCK_SIZE  # turn 1's prompt and output, full blocks
    assert samples["pdmesh:worker_kvstore_fetch_skipped_blocks_total"] == held
