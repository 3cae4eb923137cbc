"""Faults survived by `pdmesh up`: workers killed with SIGKILL, then `up` itself killed with SIGKILL.

    python bench/supervision.py                       # the embedded SmolLM2, 3 kills of each worker
    python bench/supervision.py --model DIR --kills 5

Starts `pdmesh up` as a user would, checks one greedy request, then repeatedly SIGKILLs a worker
(prefill-0 and decode-0 in turn) and times how long until the same request succeeds again with the
same tokens (the supervisor restarts the worker; the scheduler places on it once it registers).
Finally SIGKILLs `up` and times how long until none of its children is alive. Prints one row per
fault; exits non-zero if any request came back different or any child outlived `up`.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from pdmesh.client import Client  # noqa: E402


def children(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split() if (task / "children").exists() else ():
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"serve" in argv:
                name = argv[argv.index(b"--worker-id") + 1] if b"--worker-id" in argv else b"scheduler"
                found[name.decode()] = int(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def request_until_served(target: str, timeout_s: float) -> tuple[list[int], float]:
    started = time.monotonic()
    with Client(target) as client:
        while True:
            try:
                done = client.complete([1, 2, 3, 4, 5, 6, 7, 8], max_tokens=8, ignore_eos=True, timeout_s=60)
                return list(done.token_ids), time.monotonic() - started
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() - started > timeout_s:
                    raise
                time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--port", type=int, default=57051)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs of each worker")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="pdmesh-supervision-"))
    argv = [sys.executable, "-m", "pdmesh", "up", "--port", str(args.port), "--model", args.model,
            "--threads", "1", "--log-dir", str(log_dir)]  # fmt: skip
    up = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert up.stdout is not None
    started = time.monotonic()
    for line in up.stdout:
        if "Ctrl-C stops the mesh" in line:
            break
    target = f"127.0.0.1:{args.port}"
    print(f"pdmesh up ready after {time.monotonic() - started:.1f} s (logs: {log_dir})")
    expected, _ = request_until_served(target, 60)
    ok = True
    print(f"{'fault':<28} {'served again after':>20} {'same tokens':>12}")
    for kill in range(args.kills):
        for name in ("prefill-0", "decode-0"):
            os.kill(children(up.pid)[name], signal.SIGKILL)
            tokens, seconds = request_until_served(target, 300)
            ok &= tokens == expected
            print(f"{'SIGKILL ' + name + f' (#{kill + 1})':<28} {seconds:>18.1f} s {str(tokens == expected):>12}")
            time.sleep(1)  # let the restarted worker settle before the next fault
    pids = list(children(up.pid).values())
    killed = time.monotonic()
    os.kill(up.pid, signal.SIGKILL)
    up.wait()
    while any(alive(p) for p in pids) and time.monotonic() - killed < 30:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    print(f"{'SIGKILL pdmesh up':<28} {'children gone after':>20} {time.monotonic() - killed:.2f} s; left: {left}")
    return 0 if ok and not left else 1


if __name__ == "__main__":
    sys.exit(main())
