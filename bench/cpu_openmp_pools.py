"""Two-thread CPU steps with one OpenMP pool in the process against two, interleaved in one process
(issue 15; BENCHMARKS.md "OpenMP pools and spinning").

    GOMP_SPINCOUNT=20000 python bench/cpu_openmp_pools.py --model /tmp/smollm2-hf

libgomp spins an idle pool thread GOMP_SPINCOUNT times (its default 300,000) before it sleeps,
but only ~100 times once it manages more threads than the process's cores, which a second pool
(another thread that once ran a parallel op, and lives on) causes. One engine (bfloat16, two torch
threads) alternates between the two states: a 256-token prefill, then batches of decode steps at
batch 32, each with and without a second thread alive whose pool holds one more thread. Prints
p10 and median wall time per state. Set GOMP_SPINCOUNT in the environment to compare counts.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


class SecondPool:
    """While entered, a thread that ran a two-thread op is alive, and so is its OpenMP pool."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self._ran, self._leave = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._body)

    def _body(self) -> None:
        torch.set_num_threads(2)
        torch.ones(1 << 22).sum()
        self._ran.set()
        self._leave.wait()

    def __enter__(self) -> None:
        if self.active:
            self._thread.start()
            self._ran.wait()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.active:
            self._leave.set()
            self._thread.join()


def prefill_ms(engine: Engine, i: int) -> float:
    rid = f"p{i}"
    prompt = [(13 * i + 7 * j) % 30000 + 5 for j in range(256)]
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while rid in engine.requests:
        engine.step()
    return (time.perf_counter() - start) * 1000


def report(what: str, times: dict[str, list[float]]) -> None:
    for state, ms in times.items():
        ms.sort()
        print(f"{what}, {state}: p10 {ms[len(ms) // 10]:.1f} ms, median {ms[len(ms) // 2]:.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    config = EngineConfig(
        model=args.model, dtype="bfloat16", torch_threads=2, cpu_small_step_max_tokens=0,
        cache=CacheConfig(capacity_bytes=512 << 20),
    )  # fmt: skip
    engine = Engine.from_config(config)
    states = {"one pool": False, "two pools": True}
    prefill_ms(engine, -1)
    prefills: dict[str, list[float]] = {s: [] for s in states}
    for i in range(args.rounds):
        for j, (state, second) in enumerate(states.items()):
            with SecondPool(second):
                prefills[state].append(prefill_ms(engine, 2 * i + j))
    report("prefill 256", prefills)
    params = SamplingParams(max_tokens=8 * args.rounds * len(states) + 8, ignore_eos=True)
    for i in range(32):
        engine.add_request(f"d{i}", [(11 * i + 3 * j) % 30000 + 5 for j in range(256)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    steps: dict[str, list[float]] = {s: [] for s in states}
    for _ in range(args.rounds):
        for state, second in states.items():
            with SecondPool(second):
                for _ in range(8):
                    start = time.perf_counter()
                    engine.step()
                    steps[state].append((time.perf_counter() - start) * 1000)
    report("decode batch 32", steps)


if __name__ == "__main__":
    main()
