"""Seconds from starting a service to its health check answering SERVING.

    python bench/startup.py                        # the scheduler on the embedded SmolLM2, 5 runs
    python bench/startup.py --role decode --runs 3 # a decode worker (a scheduler is started first)
    python bench/startup.py --checkout ../other    # the same, run from another checkout (A/B)

Each run spawns `python -m pdmesh serve ROLE` as a user would and polls grpc.health.v1 every
20 ms: a scheduler's Registry service (it takes workers from then on; the scheduler as a whole is
SERVING only once a decode worker is live), a worker's server (SERVING once its engine and KV
listener are up and it registered with a scheduler, which is started beforehand, not timed).
The reconnect backoff is shortened so the poll itself adds no second; then the process stops.
With --checkout, runs alternate between the two checkouts (A B A B ...) so a busy machine slows
both alike; the table gives each one's median, min and max and the ratio of medians.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parents[1]
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 50),
]


def time_to_serving(checkout: Path, role: str, port: int, model: str, timeout_s: float) -> float:
    if role == "scheduler":
        return _time_to_serving(checkout, role, port, model, timeout_s, service=_REGISTRY)
    scheduler = _spawn(checkout, "scheduler", port + 50, model, "")
    try:
        _wait_serving(scheduler, port + 50, time.monotonic(), timeout_s, _REGISTRY)
        return _time_to_serving(checkout, role, port, model, timeout_s, scheduler=f"127.0.0.1:{port + 50}")
    finally:
        _stop(scheduler)


_REGISTRY = "pdmesh.v1.Registry"


def _time_to_serving(
    checkout: Path, role: str, port: int, model: str, timeout_s: float, service: str = "", scheduler: str = ""
) -> float:
    started = time.monotonic()
    proc = _spawn(checkout, role, port, model, scheduler)
    try:
        return _wait_serving(proc, port, started, timeout_s, service)
    finally:
        _stop(proc)


def _spawn(checkout: Path, role: str, port: int, model: str, scheduler: str) -> subprocess.Popen[bytes]:
    python = checkout / ".venv" / "bin" / "python"
    argv = [str(python if python.exists() else sys.executable), "-m", "pdmesh", "serve", role,
            "--host", "127.0.0.1", "--port", str(port), "--model", model]  # fmt: skip
    if role != "scheduler":
        argv += ["--kv-port", str(port + 100), "--scheduler", scheduler, "--threads", "1"]
    return subprocess.Popen(argv, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_serving(proc: subprocess.Popen[bytes], port: int, started: float, timeout_s: float, service: str) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=_FAST_RECONNECT) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[4]} exited with {proc.returncode} before serving")  # type: ignore[index]
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{proc.args[4]} did not serve within {timeout_s} s")  # type: ignore[index]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="scheduler", choices=["scheduler", "prefill", "decode"])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--port", type=int, default=56051)
    parser.add_argument("--checkout", type=Path, default=None, help="a second checkout to compare with (B)")
    parser.add_argument("--timeout-s", type=float, default=300)
    args = parser.parse_args()
    checkouts = {"A (this checkout)": HERE}
    if args.checkout is not None:
        checkouts[f"B ({args.checkout})"] = args.checkout.resolve()
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    for run in range(args.runs):
        for name, checkout in checkouts.items():
            seconds = time_to_serving(checkout, args.role, args.port, args.model, args.timeout_s)
            times[name].append(seconds)
            print(f"run {run + 1} {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
    print(f"\n{args.role} start to SERVING, {args.runs} runs, {os.cpu_count()} CPUs")
    for name, values in times.items():
        print(f"  {name:<40} median {statistics.median(values):6.2f} s   "
              f"min {min(values):6.2f}   max {max(values):6.2f}")  # fmt: skip
    if len(times) == 2:
        a, b = (statistics.median(v) for v in times.values())
        print(f"  ratio A/B of medians: {a / b:.2f}")


if __name__ == "__main__":
    main()
