"""Starting a request with part of its prompt's KV imported (what a worker does with a KV store's
blocks), and exporting the blocks a finished request left in the prefix cache (what it offers).

One engine ("the store's source") computes a conversation's first turn; its finished chain is
exported through the in-process link into another engine's prefix reservation, which then
computes only the rest of turn two and samples exactly what computing everything gives.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from engine_helpers import greedy, make_engine, run_to_completion

from engine.engine import Engine
from engine.ids import RequestId
from engine.inprocess_link import InProcessExport, InProcessImport
from kvtransfer.shm import SlabSink, block_bytes, slab_tensors

TURN1 = [(7 * i + 3) % 250 for i in range(42)]  # 42 tokens: 10 full blocks of 4 (40 tokens)
TURN2 = TURN1 + [(11 * i + 5) % 250 for i in range(17)]  # 59 tokens


def first_turn_chain(source: Engine) -> tuple:
    source.add_request("turn1", TURN1, greedy(1))
    run_to_completion(source)
    (chain,) = source.take_finished_chains()
    return chain


def last_output(engine: Engine, request_id: str) -> object:
    outs = []
    while engine.has_work():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


def test_a_request_computes_only_what_it_did_not_import(tiny_llama: Path) -> None:
    source, worker, reference = make_engine(tiny_llama), make_engine(tiny_llama), make_engine(tiny_llama)
    chain = first_turn_chain(source)
    assert len(chain) == 10  # the prompt's full blocks; the sampled token was never computed

    held = worker.reserve_prefix("turn2", TURN2, num_tokens=len(chain) * 4)
    assert (held.num_cached_tokens, held.num_import_tokens, len(held.block_ids)) == (0, 40, 10)
    landing = InProcessImport(num_layers=len(worker.kv_caches))
    assert source.export_blocks(chain, InProcessExport(worker.kv_caches, held.block_ids, landing)) == 10
    worker.add_request("turn2", TURN2, greedy(6), kv_import=landing)
    outs = last_output(worker, "turn2")

    reference.add_request("turn2", TURN2, greedy(6))
    assert [t for o in outs for t in o.new_token_ids] == run_to_completion(reference)["turn2"]
    last = outs[-1]
    assert (last.num_cached_tokens, last.num_imported_tokens, last.num_computed_prompt_tokens) == (0, 40, 19)


def test_the_engines_own_cache_comes_first_and_only_the_rest_is_imported(tiny_llama: Path) -> None:
    source, worker = make_engine(tiny_llama), make_engine(tiny_llama)
    chain = first_turn_chain(source)
    worker.add_request("earlier", TURN1[:17], greedy(1))  # leaves 4 full blocks in its cache
    run_to_completion(worker)

    held = worker.reserve_prefix("turn2", TURN2, num_tokens=len(chain) * 4)
    assert (held.num_cached_tokens, held.num_import_tokens, len(held.block_ids)) == (16, 24, 6)
    landing = InProcessImport(num_layers=len(worker.kv_caches))
    source.export_blocks(chain[4:], InProcessExport(worker.kv_caches, held.block_ids, landing))
    worker.add_request("turn2", TURN2, greedy(6), kv_import=landing)
    last = last_output(worker, "turn2")[-1]
    assert (last.num_cached_tokens, last.num_imported_tokens, last.num_computed_prompt_tokens) == (16, 24, 19)


def test_a_failed_prefix_import_is_computed_instead_and_gives_the_same_tokens(tiny_llama: Path) -> None:
    worker, reference = make_engine(tiny_llama), make_engine(tiny_llama)
    held = worker.reserve_prefix("turn2", TURN2, num_tokens=40)
    landing = InProcessImport(num_layers=len(worker.kv_caches))
    landing.failure = RuntimeError("the store went away")  # as a dropped connection reports it
    worker.add_request("turn2", TURN2, greedy(6), kv_import=landing)
    outs = last_output(worker, "turn2")

    reference.add_request("turn2", TURN2, greedy(6))
    assert [t for o in outs for t in o.new_token_ids] == run_to_completion(reference)["turn2"]
    assert held.num_import_tokens == 40
    assert (outs[-1].num_imported_tokens, outs[-1].num_computed_prompt_tokens, outs[-1].error) == (0, 59, None)


def test_a_failed_prefix_import_that_must_wait_holds_no_blocks_while_it_waits(tiny_llama: Path) -> None:
    # A 32-block pool: "hog" holds 21 blocks when the import of "turn2" (6 blocks) is found failed,
    # and the 15 blocks turn2 needs to compute its whole prompt are not there: it waits. Waiting, it
    # must hold none of its 6 (they could starve everyone), and once hog ends it runs as if never imported.
    worker, reference = make_engine(tiny_llama, num_blocks=32), make_engine(tiny_llama)
    hog_prompt = [(3 * i + 1) % 250 for i in range(80)]  # 20 blocks, unrelated to TURN2
    worker.add_request("hog", hog_prompt, greedy(8))
    hog_tokens = [t for o in worker.step() for t in o.new_token_ids]  # its prompt: 20 blocks, 12 free
    held = worker.reserve_prefix("turn2", TURN2, num_tokens=24)
    assert (held.num_import_tokens, worker.stats().num_free_blocks) == (24, 6)
    landing = InProcessImport(num_layers=len(worker.kv_caches))
    landing.failure = RuntimeError("the store went away")
    worker.add_request("turn2", TURN2, greedy(6), kv_import=landing)

    outs = worker.step()  # hog decodes into its 21st block; turn2's import is found failed
    hog_tokens += [t for o in outs for t in o.new_token_ids if o.request_id == "hog"]
    stats = worker.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_reserved_blocks) == (1, 1, 0)
    assert stats.num_free_blocks == 32 - len(worker.requests[RequestId("hog")].block_ids) == 11

    turn2: list[int] = []
    while worker.has_work():
        for o in worker.step():
            (turn2 if o.request_id == "turn2" else hog_tokens).extend(o.new_token_ids)
    reference.add_request("turn2", TURN2, greedy(6))
    reference.add_request("hog", hog_prompt, greedy(8))
    assert {"turn2": turn2, "hog": hog_tokens} == run_to_completion(reference)
    assert worker.stats().num_free_blocks == 32  # everything back (cached blocks count as free)


def test_nothing_is_held_when_the_cache_covers_the_prefix_or_the_prompt_is_short(tiny_llama: Path) -> None:
    worker = make_engine(tiny_llama)
    worker.add_request("t1", TURN1, greedy(1))
    run_to_completion(worker)

    covered = worker.reserve_prefix("again", TURN1, num_tokens=40)  # its own cache holds all 10 blocks
    assert (covered.num_cached_tokens, covered.num_import_tokens, covered.block_ids) == (40, 0, [])
    short = worker.reserve_prefix("short", [1, 2, 3, 4], num_tokens=4)  # the last token is never imported
    assert (short.num_import_tokens, worker.stats().num_reserved_blocks) == (0, 0)
    worker.add_request("again", TURN1, greedy(1))  # the id was not taken by a reservation
    run_to_completion(worker)


def test_an_aborted_prefix_reservation_gives_every_block_back(tiny_llama: Path) -> None:
    worker = make_engine(tiny_llama, num_blocks=64)
    worker.add_request("earlier", TURN1[:17], greedy(1))
    run_to_completion(worker)
    free = worker.stats().num_free_blocks

    held = worker.reserve_prefix("turn2", TURN2, num_tokens=40)
    assert len(held.block_ids) == 6 and worker.stats().num_free_blocks == free - 10
    worker.abort("turn2")
    assert worker.stats().num_free_blocks == free and worker.stats().num_reserved_blocks == 0


def test_a_block_evicted_before_its_export_cancels_the_export(tiny_llama: Path) -> None:
    source = make_engine(tiny_llama, num_blocks=16)
    chain = first_turn_chain(source)
    source.add_request("flood", [(5 * i) % 250 for i in range(60)], greedy(1))  # needs 15 of the 16 blocks
    run_to_completion(source)

    landing = InProcessImport(num_layers=len(source.kv_caches))
    export = InProcessExport(source.kv_caches, list(range(10)), landing)
    assert source.export_blocks(chain, export) == 0
    assert isinstance(landing.failure, RuntimeError) and not landing.done()


def test_blocks_go_through_host_slots_and_import_only_while_awaited(tiny_llama: Path) -> None:
    """The same-host path's copies: export into host slots laid out as a KV store's memory
    (kvtransfer.shm.SlabSink), then Engine.import_blocks from them into a reservation; greedy
    output as computing everything. After an abort the blocks may be another's: nothing copied."""
    source, worker, reference = make_engine(tiny_llama), make_engine(tiny_llama), make_engine(tiny_llama)
    chain = first_turn_chain(source)
    layout = source.kv_layout
    arena = torch.zeros(16 * block_bytes(layout), dtype=torch.uint8)
    slabs = slab_tensors(arena, layout, 16)
    slots = [3, 4, 5, 9, 10, 11, 12, 0, 1, 2]  # runs, out of order
    sink = SlabSink(slabs, slots, deadline=time.monotonic() + 60)
    assert source.export_blocks(chain, sink) == 10 and sink.landed()

    held = worker.reserve_prefix("turn2", TURN2, num_tokens=40)
    pending = InProcessImport(num_layers=len(worker.kv_caches))
    worker.add_request("turn2", TURN2, greedy(6), kv_import=pending)  # waits for its import
    assert worker.import_blocks("turn2", held.block_ids, slabs, slots) == (True, None)
    pending.layers_landed.update(range(len(worker.kv_caches)))
    outs = last_output(worker, "turn2")
    reference.add_request("turn2", TURN2, greedy(6))
    assert [t for o in outs for t in o.new_token_ids] == run_to_completion(reference)["turn2"]

    held = worker.reserve_prefix("aborted", [(t + 1) % 250 for t in TURN2], num_tokens=40)
    assert len(held.block_ids) == 10
    worker.abort("aborted")
    assert worker.import_blocks("aborted", held.block_ids, slabs, slots) == (False, None)


def test_an_export_holds_its_blocks_until_its_copies_have_run(tiny_llama: Path, monkeypatch) -> None:
    # On a GPU an export's copies are queued on the engine's stream, not done when it returns: until
    # they have run its blocks must not go back to the pool, where a flood could take them and a
    # ticket's unpack (another stream) overwrite them before the copies read them. (CPU copies are
    # done at once; a copy event that has not completed is stood in for here.)
    class Pending:
        done = False

        def query(self) -> bool:
            return self.done

    copied = Pending()
    monkeypatch.setattr("engine.block_exchange.record_event", lambda device: copied)
    source = make_engine(tiny_llama, num_blocks=16)
    chain = first_turn_chain(source)
    free_before = source.pool.num_free
    layout = source.kv_layout
    slabs = slab_tensors(torch.zeros(16 * block_bytes(layout), dtype=torch.uint8), layout, 16)
    assert source.export_blocks(chain, SlabSink(slabs, list(range(10)), deadline=time.monotonic() + 60)) == 10
    assert source.pool.num_free == free_before - 10  # held: a flood cannot take them

    source.add_request("step", [1, 2, 3], greedy(1))
    source.step()  # each step gives back what has been copied: nothing yet
    assert all(source.pool.lookup(h) is not None for h in chain)
    copied.done = True
    source.release_exported()  # what the next step, or the async engine while idle, does
    assert source.pool.num_free == free_before  # copied: back to the pool, still cached
    assert all(source.pool.lookup(h) is not None for h in chain)
