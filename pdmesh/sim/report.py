"""The simulator's results for people and programs: a console table per run, the JSON, the PNG.

The JSON holds the exact command, the profile and mesh, the SLO, every run's figures (attainment
of TTFT, TPOT and both, refused share, goodput, latency percentiles, decision latency, the
simulation's own wall time) and, per policy, the goodput found. The PNG puts SLO attainment
(both targets) against the offered rate, one line per policy, with the target drawn.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pdmesh.bench.metrics import Slo
from pdmesh.sim.mesh import MeshSpec
from pdmesh.sim.run import Run


@dataclass
class SimReport:
    command: str
    spec: MeshSpec
    slo: Slo
    target_pct: float
    load_unit: str  # "requests/s", "x trace speed" or "in flight" (a closed loop)
    runs: list[Run]
    goodput: dict[str, float | None]  # policy -> highest offered rate meeting the target
    started_unix_s: float

    def to_json(self) -> dict[str, Any]:
        spec = dataclasses.asdict(self.spec)
        return {
            "tool": "pdmesh sim", "command": self.command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started_unix_s)),
            "profile": spec.pop("profile"), "mesh": spec, "slo": dataclasses.asdict(self.slo),
            "attainment_target_pct": self.target_pct, "load_unit": self.load_unit,
            "goodput_requests_per_s": self.goodput, "runs": [_run_json(r) for r in self.runs],
        }  # fmt: skip


def _run_json(r: Run) -> dict[str, Any]:
    return {
        "policy": r.policy.value, "load": r.load, "offered_rate": _num(r.rate),
        "attainment_pct": {"ttft": r.ttft_attainment_pct, "tpot": r.tpot_attainment_pct, "both": r.attainment_pct},
        "rejected_pct": r.rejected_pct, "decision_latency_us": dataclasses.asdict(r.decisions),
        "simulation_wall_s": r.wall_s, "simulated_s": r.simulated_s, **dataclasses.asdict(r.metrics),
    }  # fmt: skip


def write_json(report: SimReport, path: Path) -> None:
    path.write_text(json.dumps(report.to_json(), indent=2, default=_num) + "\n")


def _num(x: Any) -> Any:
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def print_runs(report: SimReport, console: Console) -> None:
    s = report.spec
    table = Table(title=(
        f"pdmesh sim: {s.profile.name}, {s.num_prefill} prefill + {s.num_decode} decode; SLO TTFT "
        f"{report.slo.ttft_ms} ms, TPOT {report.slo.tpot_ms} ms; latencies in ms"
    ))  # fmt: skip
    for name in ("policy", "load", "req/s", "SLO % both", "TTFT %", "TPOT %", "refused %", "TTFT p50", "TTFT p90",
                 "TTFT p99", "TPOT p50", "TPOT p90", "TPOT p99", "goodput/s", "decide p99 µs cpu", "wall"):  # fmt: skip
        table.add_column(name, justify="right")
    for r in sorted(report.runs, key=lambda r: (r.policy.value, r.load)):
        m = r.metrics
        table.add_row(
            r.policy.value, f"{r.load:.3g}", f"{r.rate:.3g}", f"{r.attainment_pct:.1f}",
            f"{r.ttft_attainment_pct:.1f}", f"{r.tpot_attainment_pct:.1f}", f"{r.rejected_pct:.1f}",
            _ms(m.ttft_ms.p50), _ms(m.ttft_ms.p90), _ms(m.ttft_ms.p99), _ms(m.tpot_ms.p50), _ms(m.tpot_ms.p90),
            _ms(m.tpot_ms.p99), f"{m.goodput.requests_per_s:.2f}" if m.goodput else "-",
            f"{r.decisions.cpu_p99_us:,.0f}", f"{r.decisions.wall_p99_us:,.0f}",
        )  # fmt: skip
    console.print(table)
    # A decision's own cost is its CPU time; its wall time adds whatever preempted the simulator
    # (on a shared machine, other processes), which says nothing of the policy.
    console.print("decide: Placer.place per request, p99 of its thread's CPU time and of its wall time")
    for policy, value in report.goodput.items():
        shown = "not reached at any load tried" if value is None else f"{value:.3g} requests/s"
        console.print(f"goodput ({report.target_pct:g}% meeting both SLOs) of [bold]{policy}[/bold]: {shown}")


def write_plot(report: SimReport, path: Path) -> None:
    """SLO attainment (both) against offered rate, one line per policy."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot: needs matplotlib; pip install 'pdmesh[bench]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(r.policy for r in report.runs):
        runs = sorted((r for r in report.runs if r.policy is policy), key=lambda r: r.rate)
        label = policy.value
        if (g := report.goodput.get(policy.value)) is not None:
            label += f" (goodput {g:.3g}/s)"
        ax.plot([r.rate for r in runs], [r.attainment_pct for r in runs], "o-", label=label)
    ax.axhline(report.target_pct, color="red", linewidth=0.8, label=f"{report.target_pct:g}% target")
    ax.set_xscale("log")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("requests meeting both SLOs (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    s = report.spec
    ax.set_title(f"{s.profile.name}: {s.num_prefill}P + {s.num_decode}D, TTFT {report.slo.ttft_ms} ms, "
                 f"TPOT {report.slo.tpot_ms} ms", fontsize=9)  # fmt: skip
    fig.suptitle(report.command, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
