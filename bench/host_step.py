"""The host's share of a decode step at a serving batch: what the device waits through each step.

A decode step is: schedule -> build the inputs (`prepare`) -> launch (a CUDA-graph replay) -> the
previous step's outputs handed over -> sample (waits for the device) -> per-request output
(detokenize, stop checks, RequestOutput). With the graph replayed, schedule + prepare + output
are host time the device sits idle through. This runs a batch of requests through real decode
steps on an Engine (with a tokenizer, so detokenization is paid as a served request pays it) and
reports each phase's wall and thread-CPU time per step (engine.step_timer), then, with
--profile, cProfile's view of the same steps.

CPU, a random model of tiny dims with Llama 3's 128,256-token vocabulary and WordLevel tokenizer
(what the GPU mesh serves, bench/random_model.py) written to a temporary directory:
    python bench/host_step.py --batch 64 --steps 200 --profile
GPU (the 8B-shaped directory bench/random_model.py writes there; decode steps replay graphs):
    python bench/host_step.py --device cuda --model /tmp/llama8b-random --batch 64 --steps 200

Host figures on CPU are the same Python as on the GPU except the pinned upload (CPU tensors are
used as they are) and the device wait; the model's own time lands in launch and sample there.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_model import LLAMA_3_1_8B, write_model  # noqa: E402
from engine.config import BatcherConfig, CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.step_timer import Phase, StepTimes  # noqa: E402

if TYPE_CHECKING:
    from engine.output import HeldOutputs  # not in an engine from before step_held

# Llama 3's vocabulary and tokenizer, everything else small enough that the model's time on two
# CPU cores stays out of the way of the host phases being measured.
HOST_SHAPE = replace(LLAMA_3_1_8B, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=8192)  # fmt: skip
HOST_PHASES = (Phase.SCHEDULE, Phase.PREPARE, Phase.OUTPUT)  # the device idles through these


def build_engine(args: argparse.Namespace, model_dir: Path) -> Engine:
    cache = CacheConfig(capacity_bytes=1 << 30) if args.device == "cpu" else CacheConfig(gpu_memory_fraction=0.5)
    config = EngineConfig(
        model=str(model_dir), device=args.device, torch_threads=args.threads, cache=cache,
        batcher=BatcherConfig(max_running=args.batch),  # the mesh's step budget (2,048)
    )  # fmt: skip
    return Engine.from_config(config)


def start_batch(engine: Engine, batch: int, prompt_len: int, seed: int) -> None:
    """`batch` requests of random prompts, prefilled, each with ample tokens left to decode."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=engine.max_model_len - prompt_len, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"h{i}", [rng.randrange(1, vocab - 300) for _ in range(prompt_len)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(engine: Engine, steps: int, sync_outputs: bool = False) -> StepTimes:
    """`steps` decode steps as the async engine runs them on a GPU: each step's outputs built while
    the next one runs (the `dispatch` phase); their phase times alone."""
    sync(engine)
    engine.step_times = StepTimes()
    held: list[HeldOutputs] = []

    def hand_over() -> None:
        while held:
            held.pop().build()

    for _ in range(steps):
        if sync_outputs or not hasattr(engine, "step_held"):  # an engine from before step_held: its own way
            engine.step(while_device_runs=hand_over)
        else:
            held.append(engine.step_held(while_device_runs=hand_over))
    hand_over()
    sync(engine)
    return engine.step_times


def report(times: StepTimes, steps: int) -> dict[str, float]:
    """Per step, ms: each phase's wall and thread-CPU time, and the host phases' sum."""
    row = {}
    for phase in (Phase.SCHEDULE, Phase.PREPARE, Phase.LAUNCH, Phase.DISPATCH, Phase.SAMPLE, Phase.OUTPUT):
        row[phase.value] = times.seconds[phase] / steps * 1000
        row[f"{phase.value}_cpu"] = times.cpu_seconds[phase] / steps * 1000
    row["host"] = sum(row[p.value] for p in HOST_PHASES)
    row["host_cpu"] = sum(row[f"{p.value}_cpu"] for p in HOST_PHASES)
    return row


def print_row(label: str, row: dict[str, float]) -> None:
    phases = " ".join(f"{p}={row[p]:.3f}/{row[p + '_cpu']:.3f}" for p in ("schedule", "prepare", "output"))
    print(f"{label}: host {row['host']:.3f} ms/step (thread CPU {row['host_cpu']:.3f}): {phases}; "
          f"launch={row['launch']:.3f} dispatch={row['dispatch']:.3f}/{row['dispatch_cpu']:.3f} "
          f"sample={row['sample']:.3f}", flush=True)  # fmt: skip


def profile_steps(engine: Engine, steps: int, lines: int, sync_outputs: bool) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run_steps(engine, steps, sync_outputs)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats("engine/", lines)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", type=Path, default=None, help="an HF directory; default: a tiny one written now")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200, help="decode steps per measured round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync-outputs", action="store_true",
                        help="every step's outputs built in the step (Engine.step, as on CPU workers)")
    parser.add_argument("--profile", action="store_true", help="cProfile of one more round")
    parser.add_argument("--profile-lines", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="host-step-") as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            write_model(model_dir, HOST_SHAPE, torch.float32, "cpu")
        engine = build_engine(args, model_dir)
    start_batch(engine, args.batch, args.prompt_len, seed=0)
    run_steps(engine, 10, args.sync_outputs)  # warm-up
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.steps} decode steps a round, device {args.device}")
    start = time.perf_counter()
    for i in range(args.rounds):
        print_row(f"round {i + 1}", report(run_steps(engine, args.steps, args.sync_outputs), args.steps))
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.profile:
        print(profile_steps(engine, args.steps, args.profile_lines, args.sync_outputs))


if __name__ == "__main__":
    main()
