"""Where one engine step's time goes, under torch.profiler: a decode-only step (CUDA graph) and a
mixed step (the same decodes plus one prompt chunk, eager), on random Llama-3.1-8B-shaped weights.

    python bench/step_profile.py --batch 64 --chunk 256 --out-dir profile/

Writes, per step kind, the profiler's table by device time and by host time, and prints the
totals: host time of the step, device time of its kernels, and how much of the step the device
sat idle. Run it before changing the step loop, and after.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import LLAMA_8B  # noqa: E402
from engine.config import BatcherConfig, CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def start_batch(engine: Engine, batch: int, prompt_len: int) -> None:
    params = SamplingParams(max_tokens=4096, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{i}", [(7 * i + j) % 1000 + 1 for j in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()


_PROMPTS = torch.Generator().manual_seed(0)  # one stream for the whole run: no prompt repeats (no cache hits)


def profiled_steps(engine: Engine, steps: int, chunk: int) -> tuple[profile, float]:
    gen = _PROMPTS
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for i in range(steps):
            if chunk:
                prompt = torch.randint(1, 100_000, (chunk,), generator=gen).tolist()
                engine.add_request(f"c{chunk}-{i}-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1))
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    return prof, wall


def device_ms(prof: profile, steps: int) -> float:
    # Self device time counts each kernel once, under the op that launched it (microseconds).
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--chunks", default="0,256,1024", help="prompt chunk per step; 0 is decode only")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out-dir", default="profile")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = EngineConfig(
        device="cuda", cache=CacheConfig(gpu_memory_fraction=0.5),
        batcher=BatcherConfig(max_running=args.batch + 1, max_batched_tokens=4096, max_prefill_chunk=4096),
    )  # fmt: skip
    engine = Engine.with_random_weights(LLAMA_8B, config)
    start_batch(engine, args.batch, args.prompt_len)
    print(f"{'chunk':>6} {'wall ms/step':>13} {'kernel ms/step':>15} {'device idle':>12}")
    for chunk in [int(c) for c in args.chunks.split(",")]:
        profiled_steps(engine, 2, chunk)  # warm-up
        prof, wall = profiled_steps(engine, args.steps, chunk)
        busy = device_ms(prof, args.steps)
        for key in ("cuda_time_total", "cpu_time_total"):
            table = prof.key_averages().table(sort_by=key, row_limit=40)
            (out / f"chunk{chunk}_{key}.txt").write_text(table)
        print(f"{chunk:6d} {wall * 1000:13.2f} {busy:15.2f} {1 - busy / (wall * 1000):12.0%}", flush=True)
        print(f"  steps: {engine.step_times.summary()}", flush=True)


if __name__ == "__main__":
    main()
