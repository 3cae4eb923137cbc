"""What tracing costs: TPOT and TTFT of one mesh exporting every span over OTLP against an
identical mesh with nothing set (OTEL_* unset: no span recorded, nothing exported), A/B
interleaved in one run so both sides see the same machine load.

    .venv/bin/python bench/tracing_overhead.py --rounds 3 --requests 16 --concurrency 4 \
        --input-len 64 --output-len 64 --out tracing.json

Both meshes run at once (scheduler, prefill, decode each; the same model and flags); each round
sends one `pdmesh bench serve` load to A, then to B, alternating which goes first. The traced
mesh exports to an OTLP/gRPC receiver in this process (tests/otlp_receiver.py), which keeps what
it gets: the export is real, only the collector is local. Prints per-round figures and the
medians of the B/A ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdmesh.process_output import Echo, ProcessOutput  # noqa: E402
from pdmesh.up import Mesh, MeshSpec  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402


def start(port: int, args: argparse.Namespace, env: tuple[tuple[str, str], ...], logs: Path) -> Mesh:
    extra = ("--threads", str(args.threads))
    # least_loaded: every long prompt is handed off, so the traced path includes the KV push.
    policy = (("PDMESH_SCHEDULER_POLICY", "least_loaded"),)
    spec = MeshSpec(port=port, model=args.model, extra_worker_args=extra, env=(*policy, *env), http_port=None)
    mesh = Mesh(spec, output=ProcessOutput(Echo.WARNINGS, log_dir=logs))
    mesh.start(600)
    return mesh


def load(target: str, args: argparse.Namespace, out: Path, seed: int) -> dict[str, float]:
    subprocess.run(
        [sys.executable, "-m", "pdmesh", "bench", "serve", "--target", target, "--concurrency", str(args.concurrency),
         "--requests", str(args.requests), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
         "--warmup", "2", "--seed", str(seed), "--out", str(out), "--no-progress"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    run = json.loads(out.read_text())["runs"][0]
    return {
        "tpot_ms_mean": run["tpot_ms"]["mean"], "tpot_ms_p50": run["tpot_ms"]["p50"],
        "ttft_ms_mean": run["ttft_ms"]["mean"], "ttft_ms_p50": run["ttft_ms"]["p50"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--port", type=int, default=46000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tracing-overhead-"))
    with OtlpReceiver() as receiver:
        traced_env = (("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
        meshes = {
            "off": start(args.port, args, (), work / "off"),
            "on": start(args.port + 1000, args, traced_env, work / "on"),
        }
        rounds: list[dict[str, dict[str, float]]] = []
        try:
            for i in range(args.rounds):
                order = ["off", "on"] if i % 2 == 0 else ["on", "off"]
                result = {side: load(meshes[side].target, args, work / f"{side}-{i}.json", seed=i) for side in order}
                rounds.append(result)
                print(f"round {i}: " + "  ".join(f"{s} TPOT {r['tpot_ms_mean']:.2f} ms TTFT {r['ttft_ms_mean']:.1f} ms"
                                                 for s, r in result.items()), flush=True)  # fmt: skip
        finally:
            for mesh in meshes.values():
                mesh.stop()
        spans = len(receiver.spans)
    ratios = {k: statistics.median(r["on"][k] / r["off"][k] for r in rounds) for k in rounds[0]["off"]}
    print(f"traced/untraced, median over {args.rounds} rounds: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()) + f"; spans exported: {spans}")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rounds": rounds,
                                        "ratios": ratios, "spans_exported": spans}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
