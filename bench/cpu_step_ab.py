"""Two checkouts' CPU engine steps, A/B interleaved, timed by the stepping thread's CPU clock.

    python bench/cpu_step_ab.py --a /tmp/base --b . --rounds 4 --batches 1,8,32

A shared machine makes wall time useless and even a whole process's figures drift with its
load; this runs each checkout's engine in a fresh process, one torch thread (so the thread's CPU
time is the step's), A then B, `--rounds` times, and prints per round and batch the 10th
percentile and the median of 60 decode steps' CPU time (the SmolLM2 mesh's shapes: bfloat16,
256-token prompts), then the B/A ratio of the p10s pair by pair. `--a` is typically a
`git archive` of the baseline commit unpacked somewhere.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
from engine.config import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
torch.set_num_threads(1)
engine = Engine.from_config(EngineConfig(model="smollm2", dtype=sys.argv[3], torch_threads=1,
                                         cache=CacheConfig(capacity_bytes=512 << 20)))
for b in [int(x) for x in sys.argv[2].split(",")]:
    for i in range(b):
        engine.add_request(f"r{b}-{i}", [(7 * i + j) % 1000 + 1 for j in range(256)],
                           SamplingParams(max_tokens=100, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    times = []
    for _ in range(60):
        t = time.thread_time()
        engine.step()
        times.append(time.thread_time() - t)
    times.sort()
    print(f"RESULT {b} {times[6] * 1000:.3f} {times[30] * 1000:.3f}", flush=True)
    for rid in list(engine.requests):
        engine.abort(rid)
"""


def run(root: Path, batches: str, dtype: str) -> dict[int, tuple[float, float]]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), batches, dtype], capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")]
    return {int(b): (float(p10), float(med)) for b, p10, med in rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True, help="the baseline checkout's root")
    parser.add_argument("--b", default=".", help="the checkout under test")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    ratios: dict[int, list[float]] = {}
    for r in range(args.rounds):
        a = run(Path(args.a).resolve(), args.batches, args.dtype)
        b = run(Path(args.b).resolve(), args.batches, args.dtype)
        for batch in a:
            ratios.setdefault(batch, []).append(b[batch][0] / a[batch][0])
            print(f"round {r + 1} batch {batch}: A p10 {a[batch][0]:.2f} med {a[batch][1]:.2f} ms | "
                  f"B p10 {b[batch][0]:.2f} med {b[batch][1]:.2f} ms", flush=True)  # fmt: skip
    for batch, rs in ratios.items():
        print(f"batch {batch}: B/A (p10, pair by pair) median {statistics.median(rs):.3f}, "
              f"each {', '.join(f'{x:.3f}' for x in rs)}")  # fmt: skip


if __name__ == "__main__":
    main()
