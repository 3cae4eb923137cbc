"""`pdmesh bench score`: judge saved `pdmesh bench serve` runs again, at other SLOs.

A run on a GPU is dear, and the SLOs that matter are often chosen after it; the per-request
records a run keeps (`records`) let it answer any SLO pair later. For each run and SLO pair: the
share of requests meeting TTFT, TPOT and both, and the goodput (requests/s meeting both) — from
`metrics.attainment`, the very test bench serve applies, so at the run's own SLOs the score is the
goodput the run saved. Across the runs of a sweep (one file's runs; with `combine`, every file's:
a sweep split over several invocations), DistServe's goodput: the highest load up to which
every load tried has the target share of requests (90%) meeting both (`metrics.max_load_meeting`).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pdmesh.bench.metrics import Attainment, RequestResult, Slo, attainment, max_load_meeting
from pdmesh.bench.plan import LoadMode, LoadPoint
from pdmesh.bench.records import request_from_json

ALL_FILES = "all files"  # the sweep's name when the runs of every file make one


@dataclass(frozen=True)
class SavedRun:
    """One load point of a saved sweep, its requests read back."""

    source: str  # the file it came from
    point: LoadPoint
    results: list[RequestResult]


@dataclass(frozen=True)
class RunScore:
    run: SavedRun
    slo: Slo
    attainment: Attainment


@dataclass(frozen=True)
class SweepScore:
    """DistServe's goodput of one sweep at one SLO pair: the highest load (in the sweep's mode's
    unit) whose runs met the target; None when none did."""

    name: str  # the file, or ALL_FILES
    mode: LoadMode
    slo: Slo
    max_load: float | None


@dataclass(frozen=True)
class ScoreReport:
    target_pct: float
    runs: list[RunScore]
    sweeps: list[SweepScore]


def load_runs(path: Path) -> list[SavedRun]:
    """The runs of one bench serve JSON. ValueError names the file and what to do."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("tool") != "pdmesh bench serve":
        raise ValueError(f"{path}: not a `pdmesh bench serve --out` JSON")
    return [_saved_run(path, run) for run in doc.get("runs") or []]


def _saved_run(path: Path, run: dict[str, Any]) -> SavedRun:
    load = run["load"]
    point = LoadPoint(LoadMode(load["mode"]), math.inf if load["value"] == "inf" else float(load["value"]))
    if "per_request" not in run:
        raise ValueError(f"{path}: run {point.label} has no per-request records (written with --no-per-request, "
                         "or by a pdmesh that did not keep them); rerun pdmesh bench serve without it")  # fmt: skip
    try:
        results = [request_from_json(r) for r in run["per_request"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: run {point.label} has a malformed per-request record ({e!r})") from None
    return SavedRun(str(path), point, results)


def slo_pairs(ttft_ms: tuple[float, ...], tpot_ms: tuple[float, ...]) -> list[Slo]:
    """Every TTFT target with every TPOT target; an empty list means no target of that kind."""
    return [Slo(a, b) for a, b in itertools.product(ttft_ms or (None,), tpot_ms or (None,))]


def group_sweeps(runs: list[SavedRun], combine: bool) -> dict[str, list[SavedRun]]:
    """The sweeps to search: a file's runs each, or (combine) every run as one, by load."""
    if not combine:
        return {source: list(group) for source, group in itertools.groupby(runs, key=lambda r: r.source)}
    modes = sorted({r.point.mode.value for r in runs})
    if len(modes) > 1:
        raise ValueError(f"--combine: the runs are of different load modes ({', '.join(modes)}), not one sweep")
    return {ALL_FILES: sorted(runs, key=lambda r: r.point.value)}


def score(sweeps: dict[str, list[SavedRun]], slos: list[Slo], target_pct: float) -> ScoreReport:
    report = ScoreReport(target_pct, [], [])
    for slo in slos:
        for name, runs in sweeps.items():
            scored = [RunScore(run, slo, attainment(run.results, slo)) for run in runs]
            best = max_load_meeting([(s.run.point.value, s.attainment.both.attainment_pct) for s in scored],
                                    target_pct)  # fmt: skip
            report.runs.extend(scored)
            if runs:
                report.sweeps.append(SweepScore(name, runs[0].point.mode, slo, best))
    return report


def score_json(report: ScoreReport, command: str) -> dict[str, Any]:
    return {
        "tool": "pdmesh bench score",
        "command": command,
        "attainment_target_pct": report.target_pct,
        "runs": [_run_json(s) for s in report.runs],
        "sweeps": [
            {"sweep": s.name, "mode": s.mode.value, "unit": s.mode.unit, "slo": _slo_json(s.slo),
             "max_load_meeting_target": _num(s.max_load)}  # fmt: skip
            for s in report.sweeps
        ],
    }


def _run_json(s: RunScore) -> dict[str, Any]:
    a, results = s.attainment, s.run.results
    return {
        "source": s.run.source, "load": {"mode": s.run.point.mode.value, "value": _num(s.run.point.value)},
        "requests": len(results), "ok": sum(1 for r in results if r.ok), "slo": _slo_json(s.slo),
        "attainment_pct": {"ttft": a.ttft_pct, "tpot": a.tpot_pct, "both": a.both.attainment_pct},
        "good": a.both.good, "goodput_requests_per_s": a.both.requests_per_s,
    }  # fmt: skip


def _slo_json(slo: Slo) -> dict[str, float | None]:
    return {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}


def _num(x: float | None) -> float | str | None:
    return "inf" if x is not None and math.isinf(x) else x


def _target(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def print_score(report: ScoreReport, console: Console) -> None:
    table = Table(title="pdmesh bench score: the share of all requests sent meeting each SLO (%)")
    for name in ("run", "load", "requests", "ok", "TTFT SLO ms", "TPOT SLO ms", "TTFT %", "TPOT %", "both %",
                 "goodput/s"):  # fmt: skip
        table.add_column(name, justify="left" if name == "run" else "right")
    for s in report.runs:
        a = s.attainment
        table.add_row(
            s.run.source, s.run.point.label, str(len(s.run.results)),
            str(sum(1 for r in s.run.results if r.ok)), _target(s.slo.ttft_ms), _target(s.slo.tpot_ms),
            f"{a.ttft_pct:.1f}", f"{a.tpot_pct:.1f}", f"{a.both.attainment_pct:.1f}", f"{a.both.requests_per_s:.3g}",
        )  # fmt: skip
    console.print(table)
    sweeps = Table(title=f"goodput (DistServe): the highest load at which {report.target_pct:g}% meet both SLOs")
    for name in ("sweep", "TTFT SLO ms", "TPOT SLO ms", "goodput", "unit"):
        sweeps.add_column(name, justify="left" if name in ("sweep", "unit") else "right")
    for w in report.sweeps:
        best = "none met it" if w.max_load is None else f"{w.max_load:g}"
        sweeps.add_row(w.name, _target(w.slo.ttft_ms), _target(w.slo.tpot_ms), best, w.mode.unit)
    console.print(sweeps)
