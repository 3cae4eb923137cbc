"""Greedy output equals transformers' on the same weights, token for token.

The same prompts go through the engine in every configuration that changes how KV is produced —
one batch, prefix-cache hits, chunked prefill, preemption by a tiny pool, and a hand-off of KV
from one engine to another — and each must reproduce transformers' continuation exactly.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.inprocess_link import InProcessExport, InProcessImport
from kernels.cpu_native import native_decode_attention
from kernels.cpu_norm import native_rms_norm
from tests.engine.conftest import assert_greedy_up_to_ties, hf_greedy, hf_model
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion

NEW_TOKENS = 10


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


MIXED = prompts_of([1, 5, 17, 33, 40])


@pytest.fixture(scope="module")
def expected(tiny_llama: Path) -> list[list[int]]:
    return hf_greedy(tiny_llama, MIXED, NEW_TOKENS)


def submit(engine, prompts: list[list[int]], n: int = NEW_TOKENS) -> None:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(n))


def results(tokens: dict[str, list[int]], count: int) -> list[list[int]]:
    return [tokens[f"r{i}"] for i in range(count)]


def test_batch_of_mixed_lengths_matches_transformers(tiny_llama: Path, expected: list[list[int]]) -> None:
    engine = make_engine(tiny_llama)
    # Decodes and norms go through the C kernels wherever they build (kernels/cpu_native.py, cpu_norm.py).
    assert (engine.runner.cpu_attention is None) == (native_decode_attention() is None)
    assert (engine.runner.model.norm.native is None) == (native_rms_norm() is None)
    submit(engine, MIXED)
    assert results(run_to_completion(engine), len(MIXED)) == expected


@pytest.mark.parametrize("fixture", ["tiny_llama_tied", "tiny_qwen2"])
def test_tied_embeddings_and_qwen2_biases_match(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    prompts = prompts_of([3, 20, 9], seed=5)
    engine = make_engine(path)
    submit(engine, prompts)
    assert results(run_to_completion(engine), 3) == hf_greedy(path, prompts, NEW_TOKENS)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied"])
def test_bfloat16_follows_transformers_in_bfloat16(fixture: str, request: pytest.FixtureRequest) -> None:
    # The CPU fast paths (oneDNN-packed linears, the fused decode attention) in 16 bits.
    path = request.getfixturevalue(fixture)
    engine = make_engine(path, dtype="bfloat16")
    submit(engine, MIXED)
    assert_greedy_up_to_ties(hf_model(path, torch.bfloat16), MIXED, results(run_to_completion(engine), len(MIXED)))


def test_torch_default_linears_match_too(tiny_llama: Path, expected: list[list[int]]) -> None:
    engine = make_engine(tiny_llama, packed_linears=False)
    submit(engine, MIXED)
    assert results(run_to_completion(engine), len(MIXED)) == expected


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_torch_paths_without_c_kernels_match(tiny_llama: Path, expected: list[list[int]], dtype: str | None) -> None:
    # The fallback where the C kernels cannot be built (no compiler) or take no such shape.
    engine = make_engine(tiny_llama, native_attention=False, native_norm=False, dtype=dtype)
    assert engine.runner.cpu_attention is None and engine.runner.model.norm.native is None
    submit(engine, MIXED)
    tokens = results(run_to_completion(engine), len(MIXED))
    if dtype is None:
        assert tokens == expected
    else:
        assert_greedy_up_to_ties(hf_model(tiny_llama, torch.bfloat16), MIXED, tokens)


def test_prefix_cache_hits_skip_compute_and_keep_tokens(tiny_llama: Path) -> None:
    shared = prompts_of([24], seed=9)[0]
    first, second = shared + [7, 8, 9], shared + [10, 11]
    engine = make_engine(tiny_llama)
    engine.add_request("a", first, greedy(NEW_TOKENS))
    run_to_completion(engine)
    engine.add_request("b", second, greedy(NEW_TOKENS))
    outs = []
    while engine.has_work():
        outs += engine.step()
    # 24 shared tokens = 6 full blocks of 4: all of them come from the cache.
    assert outs[0].num_cached_tokens == 24
    assert [t for o in outs for t in o.new_token_ids] == hf_greedy(tiny_llama, [second], NEW_TOKENS)[0]


def test_chunked_prefill_matches(tiny_llama: Path, expected: list[list[int]]) -> None:
    engine = make_engine(tiny_llama, max_batched_tokens=8, max_prefill_chunk=6)
    submit(engine, MIXED)
    assert results(run_to_completion(engine), len(MIXED)) == expected


def test_preemption_by_a_tiny_pool_matches(tiny_llama: Path, expected: list[list[int]]) -> None:
    # 20 blocks of 4 tokens hold 80 tokens; the batch needs about 150: requests must be preempted
    # and recomputed, and the answers must not change.
    engine = make_engine(tiny_llama, num_blocks=20, prefix_caching=False)
    submit(engine, MIXED)
    tokens = run_to_completion(engine)
    assert engine.stats().num_preemptions > 0
    assert results(tokens, len(MIXED)) == expected
    assert engine.stats().num_free_blocks == 20


def test_handoff_between_two_engines_matches(tiny_llama: Path, expected: list[list[int]]) -> None:
    prefill, decode = make_engine(tiny_llama), make_engine(tiny_llama)
    for i, prompt in enumerate(MIXED):
        blocks = decode.reserve(f"r{i}", len(prompt))
        landing = InProcessImport(num_layers=len(decode.kv_caches))
        export = InProcessExport(decode.kv_caches, blocks, landing)
        prefill.add_request(f"r{i}", prompt, greedy(1), kv_export=export)
        first = run_to_completion(prefill)[f"r{i}"]
        assert landing.done()
        decode.add_request(f"r{i}", prompt, greedy(NEW_TOKENS), prior_output_ids=first, kv_import=landing)
        rest = run_to_completion(decode)[f"r{i}"]
        assert first + rest == expected[i]
    assert decode.stats().num_free_blocks == decode.stats().num_blocks


def test_preemption_with_prefix_caching_by_a_tiny_pool_ends(tiny_llama: Path) -> None:
    # With the prefix cache on, a waiting request whose cached prefix was taken but that could not
    # grow kept those blocks: preempted requests waiting could hold every block with nothing
    # running, and no step ever ran again. Each request needs up to 20 of the 24 blocks.
    prompts = [[(7 * i + j) % 250 + 1 for j in range(5 + 3 * i)] for i in range(12)]
    runs, preemptions = [], []
    for num_blocks in (24, 256):
        engine = make_engine(tiny_llama, num_blocks=num_blocks, max_batched_tokens=16, max_prefill_chunk=16)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(6 + 3 * i))
        runs.append(run_to_completion(engine, max_steps=2_000))
        assert engine.stats().num_free_blocks == num_blocks
        preemptions.append(engine.stats().num_preemptions)
    assert preemptions[0] > 0 and preemptions[1] == 0
    assert runs[0] == runs[1]
