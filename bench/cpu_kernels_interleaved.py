"""CPU decode steps with and without the C kernels — decode attention (kernels/cpu_native.py)
and RMSNorm (kernels/cpu_norm.py) — step by step interleaved on one engine (issue 15;
BENCHMARKS.md).

    python bench/cpu_kernels_interleaved.py --batches 1,8,32 --threads 1
    python bench/cpu_kernels_interleaved.py --batches 32 --threads 2

A shared machine's load drifts over seconds, so two processes timed one after the other differ
by more than the change; here the variants take turns step by step on the same engine, requests
and KV (prompts of --prompt-len tokens, contexts growing from there): "torch" (neither kernel:
SDPA over gathered blocks, the norm's torch ops), "attention" (the C decode attention) and
"attention+norm" (both, the default). Prints per batch and variant the 10th percentile and the
median of the step's wall time and of the stepping thread's CPU time (with one torch thread the
latter is the step's whole work, what load disturbs least), and each variant's median against
"torch".
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
from kernels.cpu_native import native_decode_attention  # noqa: E402
from kernels.cpu_norm import native_rms_norm  # noqa: E402

VARIANTS = ("torch", "attention", "attention+norm")


def percentiles(ts: list[float]) -> str:
    ts = sorted(ts)
    return f"p10 {ts[len(ts) // 10] * 1000:6.2f} median {ts[len(ts) // 2] * 1000:6.2f}"


def use(engine: Engine, variant: str) -> None:
    engine.runner.cpu_attention = native_decode_attention() if variant != "torch" else None
    engine.runner.model.use_native_norms(native_rms_norm() if variant == "attention+norm" else None)


def run_batch(engine: Engine, batch: int, prompt_len: int, steps: int) -> None:
    assert native_decode_attention() is not None and native_rms_norm() is not None, "the kernels did not build here"
    params = SamplingParams(max_tokens=len(VARIANTS) * steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{batch}-{i}", [(7 * i + j) % 1000 + 1 for j in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(len(VARIANTS) * steps):
        name = VARIANTS[i % len(VARIANTS)]
        use(engine, name)
        t, c = time.perf_counter(), time.thread_time()
        engine.step()
        wall[name].append(time.perf_counter() - t)
        cpu[name].append(time.thread_time() - c)
    use(engine, VARIANTS[-1])
    base = sorted(wall["torch"])[len(wall["torch"]) // 2]
    for name in VARIANTS:
        ratio = sorted(wall[name])[len(wall[name]) // 2] / base
        print(f"batch {batch:3d} {name:>14}: wall {percentiles(wall[name])} ms | step thread CPU "
              f"{percentiles(cpu[name])} ms | median / torch's {ratio:.2f}", flush=True)  # fmt: skip
    for rid in list(engine.requests):
        engine.abort(rid)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtype", default="bfloat16", help="what bench/cpu_vs_vllm.sh serves")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each variant per batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = EngineConfig(
        model="smollm2", dtype=args.dtype, torch_threads=args.threads, cache=CacheConfig(capacity_bytes=512 << 20),
        cpu_small_step_max_tokens=0,  # every step on --threads
    )  # fmt: skip
    engine = Engine.from_config(config)
    for b in [int(x) for x in args.batches.split(",")]:
        run_batch(engine, b, args.prompt_len, args.steps)


if __name__ == "__main__":
    main()
