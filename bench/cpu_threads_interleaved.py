"""The CPU engine's decode step on one thread against two, step by step interleaved in one process
(issue 15; BENCHMARKS.md "Where a c1 token goes in the live mesh").

    python bench/cpu_threads_interleaved.py --batch 1 --steps 60

One engine (SmolLM2 in bfloat16, 256-token prompts), its requests decoding; consecutive steps
alternate between one and two torch threads, each timed on the wall clock (a two-thread step's
work is on two threads, so a thread's CPU clock would not do). Prints p10 and median per count.
The engine's own per-step choice (engine.cpu_threads) is turned off here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per thread count")
    args = parser.parse_args()
    config = EngineConfig(
        model="smollm2", dtype="bfloat16", torch_threads=2, cpu_small_step_max_tokens=0,
        cache=CacheConfig(capacity_bytes=512 << 20),
    )  # fmt: skip
    engine = Engine.from_config(config)
    params = SamplingParams(max_tokens=2 * args.steps + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"r{i}", [(7 * i + j) % 1000 + 1 for j in range(256)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    times: dict[int, list[float]] = {1: [], 2: []}
    for i in range(2 * args.steps):
        threads = 1 + i % 2
        torch.set_num_threads(threads)
        start = time.perf_counter()
        engine.step()
        times[threads].append(time.perf_counter() - start)
    for threads, ts in times.items():
        ts.sort()
        print(
            f"batch {args.batch}, {threads} thread(s): p10 {ts[len(ts) // 10] * 1e3:.2f} ms, "
            f"median {ts[len(ts) // 2] * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
