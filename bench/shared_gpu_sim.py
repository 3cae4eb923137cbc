"""Issue 15's c16x4kl on one simulated H100: 1 prefill + 1 decode worker time-slicing the GPU under
`slo`, against the colocated mesh (the decode worker alone) and against two GPUs, in a closed loop
(`pdmesh sim --concurrency`), with the plans counted.

    python bench/shared_gpu_sim.py --prefill-forecast-scale 0.9

On the H100 the prefill worker's fitted step model forecast its prompts cheaper than the decode
worker's local prefill of the same prompt; the simulator's workers share one step model, so a run
as it is does not show what that did. `--prefill-forecast-scale` multiplies the compute the policy
forecasts for a prompt on a prefill worker (its plan's cost only: the simulated steps keep their
own times), which reproduces the H100's placement: when the forecast treated the GPU as one queue,
the waits tied and the cheaper plan took prompts behind the prefill worker's queue (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, before bench/ (its engine.py)

from pdmesh.bench.metrics import Slo  # noqa: E402
from pdmesh.bench.workload import LengthRange  # noqa: E402
from pdmesh.config import PolicyName, SloConfig  # noqa: E402
from pdmesh.sim import mesh as sim_mesh  # noqa: E402
from pdmesh.sim.mesh import MeshSpec  # noqa: E402
from pdmesh.sim.run import simulate  # noqa: E402
from pdmesh.sim.workload import at_speedup, drawn_shapes  # noqa: E402
from services.scheduler import slo as slo_policy  # noqa: E402
from services.scheduler.profile import H100_LLAMA_8B  # noqa: E402

MESHES = (("1P+1D on 1 GPU", 1, 1), ("colocated, 1 GPU", 0, 1), ("1P+1D on 2 GPUs", 1, 2))


def _scaled_prefill_forecasts(scale: float) -> None:
    forecast = slo_policy.prefill_on

    def scaled(*args, **kwargs):  # type: ignore[no-untyped-def]
        p = forecast(*args, **kwargs)
        return dataclasses.replace(p, compute_ms=p.compute_ms * scale)

    slo_policy.prefill_on = scaled  # type: ignore[assignment]


def _counted_plans(plans: Counter[str]) -> None:
    start = sim_mesh.SimMesh._start

    def counted(self, job, placement):  # type: ignore[no-untyped-def]
        plans["local" if placement.prefill is None else "handed off"] += 1
        return start(self, job, placement)

    sim_mesh.SimMesh._start = counted  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill-forecast-scale", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args()
    _scaled_prefill_forecasts(args.prefill_forecast_scale)
    plans: Counter[str] = Counter()
    _counted_plans(plans)
    lengths = LengthRange(args.input_len, args.input_len), LengthRange(args.output_len, args.output_len)
    requests = at_speedup(drawn_shapes(args.requests, *lengths, 512, 0), 1.0)
    slo = SloConfig(default_ttft_ms=30_000, default_tpot_ms=0)
    print("| mesh | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | local / handed off | output tok/s |")
    for name, prefill, gpus in MESHES:
        plans.clear()
        spec = MeshSpec(H100_LLAMA_8B, prefill, 1, 512, slo, gpus=gpus)
        run = simulate(spec, PolicyName.SLO, args.concurrency, requests, Slo(30_000, None), None, args.concurrency)
        t, s = run.metrics.ttft_ms, run.metrics.tpot_ms
        print(f"| {name} | {t.p50:,.0f} / {t.p90:,.0f} / {t.p99:,.0f} | {s.p50:.1f} / {s.p90:.1f} / {s.p99:.1f} | "
              f"{plans['local']} / {plans['handed off']} | {run.metrics.output_tokens_per_s:.0f} |")


if __name__ == "__main__":
    main()
