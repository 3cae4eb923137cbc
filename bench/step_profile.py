"""Where one engine step's time goes, under torch.profiler: a decode-only step and a mixed step
(the same decodes plus one prompt chunk).

GPU (random Llama-3.1-8B-shaped weights; decode steps replay a CUDA graph, mixed ones run eager):
    python bench/step_profile.py --batch 64 --chunks 0,256 --out-dir profile/
CPU (the embedded SmolLM2-135M-Instruct, as the mesh serves it):
    python bench/step_profile.py --device cpu --dtype bfloat16 --threads 2 --batch 8 --prompt-len 256 --chunks 0,256

Writes, per step kind, the profiler's table by device time and by host time (CPU: by op time,
self and total), and prints the totals: on a GPU the host time of the step, the device time of
its kernels and how much of the step the device sat idle; on a CPU the step's wall time, the
stepping thread's CPU time (what a busy shared machine disturbs least) and the share of the
step spent in linears, attention, and everything else (norms, rotary, residuals, sampling, the
step's Python). Run it before changing the step loop, and after.
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


def profiled_steps(engine: Engine, steps: int, chunk: int) -> tuple[profile, float, float]:
    """The profile, wall seconds per step and the stepping thread's CPU seconds per step."""
    gen, cuda = _PROMPTS, engine.device.type == "cuda"
    vocab = engine.model_config.vocab_size
    sync(engine)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        t, cpu = time.perf_counter(), time.thread_time()
        for i in range(steps):
            if chunk:
                prompt = torch.randint(1, vocab, (chunk,), generator=gen).tolist()
                engine.add_request(f"c{chunk}-{i}-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1))
            engine.step()
        sync(engine)
        wall, cpu = (time.perf_counter() - t) / steps, (time.thread_time() - cpu) / steps
    return prof, wall, cpu


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


# Ops by where a CPU step's time goes (their self time; the rest is "other").
_LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")
_ATTENTION_OPS = ("scaled_dot_product", "aten::index_select", "aten::index_copy_")


def cpu_shares(prof: profile) -> dict[str, float]:
    """Fractions of the profiled self CPU time in linears, attention (gathers, KV writes, SDPA) and other ops."""
    totals = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        kind = (
            "linear" if e.key in _LINEAR_OPS else "attention" if any(a in e.key for a in _ATTENTION_OPS) else "other"
        )
        totals[kind] += e.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in totals.items()}


def device_ms(prof: profile, steps: int) -> float:
    # Self device time counts each kernel once, under the op that launched it (microseconds).
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / steps


def build_engine(args: argparse.Namespace) -> Engine:
    if args.device == "cpu":
        config = EngineConfig(
            model=args.model, dtype=args.dtype, torch_threads=args.threads, cache=CacheConfig(capacity_bytes=1 << 30),
            batcher=BatcherConfig(max_running=args.batch + 1, max_batched_tokens=4096, max_prefill_chunk=4096),
        )  # fmt: skip
        return Engine.from_config(config)
    config = EngineConfig(
        device="cuda", cache=CacheConfig(gpu_memory_fraction=0.5),
        batcher=BatcherConfig(max_running=args.batch + 1, max_batched_tokens=4096, max_prefill_chunk=4096),
    )  # fmt: skip
    return Engine.with_random_weights(LLAMA_8B, config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="smollm2", help="CPU: the checkpoint (GPU: random 8B-shaped weights)")
    parser.add_argument("--dtype", default=None, help="CPU: float32 (default) or bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--chunks", default="0,256,1024", help="prompt chunk per step; 0 is decode only")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out-dir", default="profile")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    engine = build_engine(args)
    start_batch(engine, args.batch, args.prompt_len)
    if cuda:
        print(f"{'chunk':>6} {'wall ms/step':>13} {'kernel ms/step':>15} {'device idle':>12}")
    else:
        cols = ("thread CPU ms/step", 19), ("linear", 7), ("attention", 10), ("other", 6)
        print(f"{'chunk':>6} {'wall ms/step':>13} " + " ".join(f"{name:>{width}}" for name, width in cols))
    for chunk in [int(c) for c in args.chunks.split(",")]:
        profiled_steps(engine, 2, chunk)  # warm-up
        prof, wall, cpu = profiled_steps(engine, args.steps, chunk)
        keys = ("cuda_time_total", "cpu_time_total") if cuda else ("self_cpu_time_total", "cpu_time_total")
        for key in keys:
            table = prof.key_averages().table(sort_by=key, row_limit=40)
            (out / f"chunk{chunk}_{key}.txt").write_text(table)
        if cuda:
            busy = device_ms(prof, args.steps)
            print(f"{chunk:6d} {wall * 1000:13.2f} {busy:15.2f} {1 - busy / (wall * 1000):12.0%}", flush=True)
        else:
            shares = cpu_shares(prof)
            print(f"{chunk:6d} {wall * 1000:13.2f} {cpu * 1000:19.2f} {shares['linear']:7.0%} "
                  f"{shares['attention']:10.0%} {shares['other']:6.0%}", flush=True)  # fmt: skip
        print(f"  steps: {engine.step_times.summary()}", flush=True)


if __name__ == "__main__":
    main()
