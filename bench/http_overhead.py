"""What the OpenAI HTTP door costs beside the gRPC door: the same load through both, interleaved.

    pdmesh up --port 32051 --http-port 32800 &      # any mesh; both doors are the scheduler's
    python bench/http_overhead.py --target 127.0.0.1:32051 --base-url http://127.0.0.1:32800/v1 \\
        --concurrency 32 --requests 64 --input-len 32 --output-len 16 --rounds 3 --out http_overhead.json

Each round runs `pdmesh bench serve` once over gRPC and once over HTTP (the order alternating from
round to round), so a busy machine slows both alike. Besides bench serve's figures (TTFT, output
tokens/s) it reads the scheduler process's CPU time (utime + stime from /proc) around every run:
the doors differ only inside the scheduler, and its CPU seconds per request show that difference
even when the workers' compute hides it end to end. The load generator's own CPU per request is
read too (its HTTP client parses server-sent events in Python, gRPC's parses in C): on a small
machine the client competes with the mesh for the same cores. The table gives each API's median over the
rounds and the HTTP/gRPC ratio of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_TICKS = os.sysconf("SC_CLK_TCK")


def scheduler_pid(port: int) -> int:
    """The process whose command line serves the scheduler on this port."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"scheduler" in argv and b"serve" in argv and str(port).encode() in argv:
            return int(entry.name)
    raise SystemExit(f"no `pdmesh serve scheduler --port {port}` process found")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(api: str, args: argparse.Namespace, pid: int, out: Path) -> dict[str, Any]:
    door = ["--target", args.target] if api == "grpc" else ["--base-url", args.base_url]
    if api == "openai" and args.api_key:
        door += ["--api-key", args.api_key]
    command = [sys.executable, "-m", "pdmesh", "bench", "serve", *door, "--concurrency", str(args.concurrency),
               "--requests", str(args.requests), "--input-len", str(args.input_len), "--output-len",
               str(args.output_len), "--no-progress", "--out", str(out)]  # fmt: skip
    before, client_before = cpu_seconds(pid), _children_cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True)
    used, client_used = cpu_seconds(pid) - before, _children_cpu_seconds() - client_before
    if done.returncode != 0:
        raise SystemExit(f"{api}: bench serve failed:\n{done.stderr}")
    (run,) = json.loads(out.read_text())["runs"]
    if run["failed"]:
        raise SystemExit(f"{api}: {run['failed']} requests failed: {run['errors']}")
    return {
        "api": api, "ttft_p50_ms": run["ttft_ms"]["p50"], "ttft_p99_ms": run["ttft_ms"]["p99"],
        "tpot_p50_ms": run["tpot_ms"]["p50"], "output_tokens_per_s": run["output_tokens_per_s"],
        "scheduler_cpu_ms_per_request": used * 1000 / run["ok"],
        "client_cpu_ms_per_request": client_used * 1000 / run["ok"], "command": " ".join(command),
    }  # fmt: skip


KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "output_tokens_per_s", "scheduler_cpu_ms_per_request",
        "client_cpu_ms_per_request")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each API's median over the rounds, and the HTTP/gRPC ratio within each round (the two runs
    of a round share the machine's load): its median, lowest and highest."""
    medians = {api: {k: statistics.median(r[k] for r in runs if r["api"] == api) for k in KEYS}
               for api in ("grpc", "openai")}  # fmt: skip
    rounds = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    paired = {k: [(a if a["api"] == "openai" else b)[k] / (a if a["api"] == "grpc" else b)[k] for a, b in rounds]
              for k in KEYS}  # fmt: skip
    medians["ratio_median"] = {k: statistics.median(v) for k, v in paired.items()}
    medians["ratio_min"] = {k: min(v) for k, v in paired.items()}
    medians["ratio_max"] = {k: max(v) for k, v in paired.items()}
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="the scheduler's gRPC host:port")
    parser.add_argument("--base-url", required=True, help="its HTTP door: http://HOST:PORT/v1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pid = scheduler_pid(int(args.target.rsplit(":", 1)[1]))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for api in ("grpc", "openai") if i % 2 == 0 else ("openai", "grpc"):
                runs.append(run_once(api, args, pid, Path(tmp) / f"{api}-{i}.json"))
                r = runs[-1]
                print(f"round {i} {api:>6}: TTFT p50 {r['ttft_p50_ms']:.0f} ms, {r['output_tokens_per_s']:.1f} tok/s, "
                      f"CPU per request: scheduler {r['scheduler_cpu_ms_per_request']:.2f} ms, "
                      f"client {r['client_cpu_ms_per_request']:.2f} ms", flush=True)  # fmt: skip
    summary = summarize(runs)
    for name, figures in summary.items():
        print(f"{name:>7}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    if args.out is not None:
        args.out.write_text(json.dumps({"runs": runs, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
