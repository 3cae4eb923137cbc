"""A sweep's results for people and programs: the console table, the JSON file and the PNG.

The JSON holds, per load point, the counts `ok` and `failed` (and failures by status code) beside
every figure and (unless --no-per-request) every request's record (`records`), plus the exact
command and the plan, so a figure can always be traced to how it was measured, and a run judged
again at other SLOs (`pdmesh bench score`). The plot puts latency percentiles and throughput
against the load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pdmesh.bench.backend import ServerInfo
from pdmesh.bench.metrics import RequestResult, RunMetrics, max_load_meeting
from pdmesh.bench.plan import BenchPlan, LoadMode, LoadPoint
from pdmesh.bench.records import request_json


@dataclass
class PointResult:
    point: LoadPoint
    metrics: RunMetrics
    results: list[RequestResult]


@dataclass
class SweepResult:
    plan: BenchPlan
    command: str
    server: ServerInfo
    started_unix_s: float
    points: list[PointResult]

    def best_load_meeting_slo(self) -> float | None:
        """DistServe's goodput across a sweep: the highest load up to which every load tried met
        the attainment target (None when the lowest missed it, or no SLO was given)."""
        met = [(p.point.value, p.metrics.goodput.attainment_pct) for p in self.points if p.metrics.goodput is not None]
        return max_load_meeting(met, self.plan.attainment_target_pct)


def point_json(p: PointResult, per_request: bool, token_times: bool = False) -> dict[str, Any]:
    value = int(p.point.value) if p.point.mode is LoadMode.CONCURRENCY else _num(p.point.value)
    doc: dict[str, Any] = {"load": {"mode": p.point.mode.value, "value": value}}
    doc.update(dataclasses.asdict(p.metrics))
    if per_request:
        doc["per_request"] = [request_json(r, token_times) for r in p.results]
    return doc


def sweep_json(sweep: SweepResult) -> dict[str, Any]:
    best = sweep.best_load_meeting_slo()
    return {
        "tool": "pdmesh bench serve",
        "command": sweep.command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(sweep.started_unix_s)),
        "client_host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                        "python": platform.python_version()},  # fmt: skip
        "server": dataclasses.asdict(sweep.server),
        "plan": sweep.plan.to_json(),
        "runs": [point_json(p, sweep.plan.per_request, sweep.plan.token_times) for p in sweep.points],
        "goodput_sweep": {
            "attainment_target_pct": sweep.plan.attainment_target_pct,
            "max_load_meeting_target": None if best is None else _num(best),
            "mode": sweep.plan.mode.value,
        },
    }


def write_json(sweep: SweepResult, path: Path) -> None:
    path.write_text(json.dumps(sweep_json(sweep), indent=2, default=_num) + "\n")


def _num(x: Any) -> Any:
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def print_table(sweep: SweepResult, console: Console) -> None:
    table = Table(title=f"pdmesh bench serve: {sweep.server.model} ({sweep.server.detail}); latencies in ms")
    for name in (sweep.plan.mode.value, "ok", "failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50",
                 "TPOT p99", "ITL p99", "E2E p50", "goodput/s", "SLO %"):  # fmt: skip
        table.add_column(name, justify="right")
    for p in sweep.points:
        m = p.metrics
        g = m.goodput
        failed = f"[red]{m.failed}[/red]" if m.failed else "0"
        table.add_row(
            p.point.label.split("=")[1], str(m.ok), failed, f"{m.request_rate:.2f}", f"{m.output_tokens_per_s:.1f}",
            _ms(m.ttft_ms.p50), _ms(m.ttft_ms.p99), _ms(m.tpot_ms.p50), _ms(m.tpot_ms.p99), _ms(m.itl_ms.p99),
            _ms(m.e2e_ms.p50), "-" if g is None else f"{g.requests_per_s:.2f}",
            "-" if g is None else f"{g.attainment_pct:.0f}",
        )  # fmt: skip
    console.print(table)
    for p in sweep.points:
        if p.metrics.failed:
            console.print(f"[red]{p.point.label}[/red] failed by code: {p.metrics.failed_by_code}")
        for e in p.metrics.errors:
            console.print(f"  {e}")


def write_plot(sweep: SweepResult, path: Path) -> None:
    """TTFT and TPOT percentiles, output tokens/s and (with SLOs) attainment against the load,
    one PNG. Load points sit evenly spaced, labelled with their value (1, 8, 32; a rate of inf)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot: needs matplotlib; pip install 'pdmesh[bench]' (or matplotlib)") from None
    matplotlib.use("Agg")  # no display; imported here so a run without --plot needs no matplotlib
    import matplotlib.pyplot as plt

    xs = list(range(len(sweep.points)))
    slo = sweep.plan.slo
    fig, axes = plt.subplots(1, 4 if slo.is_set else 3, figsize=(18 if slo.is_set else 14, 4.2))
    for ax, name, target in zip(axes, ("ttft_ms", "tpot_ms"), (slo.ttft_ms, slo.tpot_ms), strict=False):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [_or_nan(getattr(getattr(p.metrics, name), q)) for p in sweep.points], style, label=q)
        if target is not None:
            ax.axhline(target, color="red", linewidth=0.8, label="SLO")
        ax.set_title(name.removesuffix("_ms").upper() + " (ms)")
        ax.legend()
    axes[2].plot(xs, [p.metrics.output_tokens_per_s for p in sweep.points], "o-")
    axes[2].set_title("Output tokens/s")
    for x, p in zip(xs, sweep.points, strict=True):
        if p.metrics.failed:  # throughput without its failures would mislead
            axes[2].annotate(f"{p.metrics.failed} failed", (x, p.metrics.output_tokens_per_s), color="red",
                             textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    if slo.is_set:
        axes[3].plot(xs, [p.metrics.goodput.attainment_pct if p.metrics.goodput else math.nan for p in sweep.points],
                     "o-")  # fmt: skip
        axes[3].axhline(sweep.plan.attainment_target_pct, color="red", linewidth=0.8)
        axes[3].set_title("SLO attainment (%)")
        axes[3].set_ylim(0, 105)
    for ax in axes:
        ax.set_xticks(xs, [p.point.label.split("=")[1] for p in sweep.points])
        ax.set_xlabel(sweep.plan.mode.unit)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{sweep.server.model} ({sweep.server.detail})\n{sweep.command}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _or_nan(x: float | None) -> float:
    return math.nan if x is None else x
