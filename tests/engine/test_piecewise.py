"""Piecewise execution (engine/piecewise.py) computes what the model's own forward computes.

On CUDA each piece is a captured graph; on a CPU the pieces run as plain functions, which checks
the decomposition itself: the same tokens, step by step, for chunked prefills, prefix-cache hits
and decodes sharing a batch.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.piecewise import PiecewiseGraphs
from engine.step_timer import StepKind
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion


@pytest.mark.parametrize("kv_in_pieces", [False, True], ids=["attention-writes-kv", "pieces-write-kv"])
def test_piecewise_steps_give_the_model_forward_s_tokens(tiny_llama: Path, kv_in_pieces: bool) -> None:
    # kv_in_pieces: the pieces write K/V into the cache (the CUDA path, here through the torch
    # reference), padding rows at slot -1 skipped.
    rng = random.Random(3)
    shared = [rng.randrange(256) for _ in range(24)]  # a prefix the cache serves to the later prompts
    prompts = [shared + [rng.randrange(256) for _ in range(n)] for n in (1, 9, 30, 57)] + [[5], [7, 8]]
    results = []
    for piecewise in (False, True):
        engine = make_engine(tiny_llama, max_batched_tokens=40, max_prefill_chunk=16)
        if piecewise:
            pieces = PiecewiseGraphs(engine.runner.model, engine.kv_caches, max_tokens=40)
            pieces.kv_in_pieces = kv_in_pieces
            pieces.capture_all()
            engine.runner.pieces = pieces
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, greedy(10))
        results.append(run_to_completion(engine))
        kinds = engine.step_times.steps
        op_by_op = kinds[StepKind.MIXED] + kinds[StepKind.EAGER_DECODE]
        assert (kinds[StepKind.PIECEWISE] > 0, op_by_op > 0) == (piecewise, not piecewise)
    assert results[1] == results[0]


def test_a_step_larger_than_the_largest_bucket_runs_op_by_op(tiny_llama: Path) -> None:
    engine = make_engine(tiny_llama, max_batched_tokens=512, max_prefill_chunk=512)
    pieces = PiecewiseGraphs(engine.runner.model, engine.kv_caches, max_tokens=64)
    pieces.capture_all()
    engine.runner.pieces = pieces
    engine.add_request("long", list(torch.arange(200).remainder(256).tolist()), greedy(2))
    run_to_completion(engine)
    assert engine.step_times.steps[StepKind.MIXED] == 1  # the 200-token prefill
    assert engine.step_times.steps[StepKind.PIECEWISE] == 1  # the decode step (a CPU has no decode graphs)
