"""Per-step CPU thread counts: small steps on one thread fewer, the rest on the configured count,
and greedy tokens that do not depend on which a step got; and one OpenMP pool a worker: no thread
but the step thread starts one."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.cpu_threads import CpuThreads, one_thread_here
from engine.engine import Engine
from services.worker.server import load_engine
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


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _threads_settle(at_most: int) -> int:
    """The thread count once threads that are ending have gone (a pool's threads end just after
    the thread that started it)."""
    deadline = time.monotonic() + 5
    while _threads() > at_most and time.monotonic() < deadline:
        time.sleep(0.01)
    return _threads()


def _threads_while(work: Callable[[], object]) -> int:
    """This process's threads while a new thread that ran `work` is still alive (an OpenMP pool
    lives as long as the thread that started it)."""
    ran, leave = threading.Event(), threading.Event()

    def body() -> None:
        work()
        ran.set()
        leave.wait()

    thread = threading.Thread(target=body)
    thread.start()
    ran.wait()
    count = _threads()
    leave.set()
    thread.join()
    return count


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_thread_on_one_torch_thread_starts_no_openmp_pool() -> None:
    big = torch.ones(1 << 22)  # large enough that torch splits the sum over its threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what a thread started now takes on its first parallel op
        alone = _threads() + 1  # + the thread itself
        assert _threads_while(lambda: big.sum()) == alone + 1  # its own pool: one more thread
        _threads_settle(alone - 1)
        torch.set_num_threads(2)
        assert _threads_while(lambda: (one_thread_here(), big.sum())) == alone
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
async def test_the_worker_loads_its_engine_on_a_thread_that_ends(tiny_llama: Path) -> None:
    """No loader thread, and so no OpenMP pool of the loading, outlives the load."""
    before = _threads()
    engine = await load_engine(EngineConfig(model=str(tiny_llama), device="cpu", torch_threads=2))
    assert engine.model_config.num_layers > 0
    assert _threads_settle(before) == before
