"""Per-step CPU thread counts: small steps on one thread fewer, the rest on the configured count,
and greedy tokens that do not depend on which a step got."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.cpu_threads import CpuThreads
from engine.engine import Engine
from tests.engine.engine_helpers import greedy, make_engine, run_to_completion


def test_small_steps_leave_a_core_and_larger_ones_get_all() -> None:
    before = torch.get_num_threads()
    try:
        threads = CpuThreads(2, small_step_max_tokens=64)
        assert threads.fit(1) == 1 and torch.get_num_threads() == 1
        assert threads.fit(64) == 1
        assert threads.fit(65) == 2 and torch.get_num_threads() == 2
        assert threads.fit(256) == 2
        assert CpuThreads(8, small_step_max_tokens=64).fit(32) == 7
        assert CpuThreads(1, small_step_max_tokens=64).fit(1) == 1  # never below one
        assert CpuThreads(2, small_step_max_tokens=0).fit(1) == 2  # 0 turns the cutoff off
    finally:
        torch.set_num_threads(before)


def test_a_non_cpu_engine_leaves_the_count_alone() -> None:
    before = torch.get_num_threads()
    CpuThreads.for_device(torch.device("meta"), small_step_max_tokens=64).fit(1)
    assert torch.get_num_threads() == before


def _tokens(engine: Engine, prompts: list[list[int]]) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(12))
    return run_to_completion(engine)


def test_greedy_tokens_do_not_depend_on_the_step_thread_count(tiny_llama: Path) -> None:
    """Every step here is small: one thread with the cutoff, two without it."""
    prompts = [[1 + (7 * i + j) % 50 for j in range(9 + i)] for i in range(3)]
    before = torch.get_num_threads()
    try:
        with_cutoff = make_engine(tiny_llama)  # torch_threads=2
        with_cutoff.cpu_threads.small_step_max_tokens = 64  # every step here, prompts included
        one_thread = _tokens(with_cutoff, prompts)
        assert torch.get_num_threads() == 1
        without = make_engine(tiny_llama)
        without.cpu_threads.small_step_max_tokens = 0
        assert _tokens(without, prompts) == one_thread
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
