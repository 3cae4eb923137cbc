"""One run of bench/cpu_mesh_ab.sh in a few lines: throughput, TPOT, CPU per mesh process, and the
decode worker's step loop (wall against the step thread's CPU time).

    python bench/cpu_mesh_ab_summary.py RUN_DIR LABEL
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

_TICK_MS = 10  # /proc/PID/stat counts CPU time in clock ticks of 10 ms


def _ticks(path: Path) -> dict[str, int]:
    return {pid: int(ticks) for pid, ticks in (line.split() for line in path.read_text().splitlines())}


def _roles(path: Path) -> dict[str, str]:
    roles = {}
    for line in path.read_text().splitlines():
        pid, _, args = line.strip().partition(" ")
        words = args.split()
        roles[pid] = words[words.index("serve") + 1] if "serve" in words else "up"
    return roles


def _step_loop(log: Path) -> dict[str, object] | None:
    for line in reversed(log.read_text().splitlines()):
        if "engine step loop" in line:
            event = json.loads(line)["event"]
            return ast.literal_eval(event.split(": ", 1)[1])  # the summary dict, as logged
    return None


def main() -> None:
    run, label = Path(sys.argv[1]), sys.argv[2]
    point = json.loads((run / "run.json").read_text())
    point = point["runs"][0] if "runs" in point else point
    tpot, ttft = point.get("tpot_ms") or {}, point.get("ttft_ms") or {}
    print(
        f"== {label}: {point['ok']} ok, {point['failed']} failed, {point['output_tokens_per_s']:.1f} out tok/s, "
        f"TTFT p50 {ttft.get('p50', float('nan')):.0f} ms, TPOT p50 {tpot.get('p50', float('nan')):.2f} ms"
    )
    before, after, roles = _ticks(run / "cpu_before.txt"), _ticks(run / "cpu_after.txt"), _roles(run / "processes.txt")
    tokens = point["total_output_tokens"]
    cpu = {roles.get(pid, pid): (t - before.get(pid, 0)) * _TICK_MS for pid, t in after.items()}
    print("   CPU ms per output token: " + ", ".join(f"{r} {ms / tokens:.2f}" for r, ms in sorted(cpu.items()) if ms))
    loop = _step_loop(run / "logs" / "decode-0.log")
    if loop is not None:
        wall, cpu_ms = loop["phase_ms"], loop["phase_cpu_ms"]
        assert isinstance(wall, dict) and isinstance(cpu_ms, dict)
        print(
            f"   step loop: {loop['steps']}, mean ms {loop['mean_step_ms']}; forward wall {wall['launch']:.0f} ms, "
            f"step thread CPU {cpu_ms['launch']:.0f} ms ({cpu_ms['launch'] / max(wall['launch'], 1e-9):.0%})"
        )


if __name__ == "__main__":
    main()
