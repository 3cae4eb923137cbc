"""`pdmesh bench score` on hand-built runs: saved the way bench serve saves them (its own writer),
read back and judged at other SLOs, with every attainment and goodput worked out by hand.

A sweep of three rates is built so that the share meeting the TTFT target falls 100 -> 90 -> 80%
as the load grows: DistServe's goodput is the rate whose run still met 90%.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pdmesh.bench.metrics import RequestResult, Slo, summarize
from pdmesh.bench.plan import LoadMode, LoadPoint
from pdmesh.bench.records import request_from_json, request_json
from pdmesh.bench.report import PointResult, point_json
from pdmesh.bench.score import ALL_FILES, group_sweeps, load_runs, score, slo_pairs
from pdmesh.cli import main
from tests.pdmesh.test_bench_metrics import answered, four_requests


def save(path: Path, points: list[tuple[LoadPoint, list[RequestResult]]], slo: Slo | None = None) -> Path:
    """A bench serve JSON of these runs, written by bench serve's own writer for runs."""
    runs = [point_json(PointResult(p, summarize(rs, slo), rs), per_request=True) for p, rs in points]
    path.write_text(json.dumps({"tool": "pdmesh bench serve", "runs": runs}))
    return path


def run_at(ttfts_s: list[float]) -> list[RequestResult]:
    """One request a second, each answering 3 tokens 100 ms apart after its TTFT: TPOT 100 ms."""
    return [answered(i, float(i), [(t, 1), (t + 0.1, 1), (t + 0.2, 1)]) for i, t in enumerate(ttfts_s)]


def rate_sweep() -> list[tuple[LoadPoint, list[RequestResult]]]:
    # Ten requests per rate; one, then two of them answer late (500 ms) as the rate grows.
    return [
        (LoadPoint(LoadMode.RATE, 1), run_at([0.1] * 10)),
        (LoadPoint(LoadMode.RATE, 2), run_at([0.1] * 9 + [0.5])),
        (LoadPoint(LoadMode.RATE, 4), run_at([0.1] * 8 + [0.5] * 2)),
    ]


def test_a_record_reads_back_as_the_request_it_was() -> None:
    r = answered(7, 1.25, [(0.1, 1), (0.3, 2)], prompt_tokens=40)
    r.scheduled_s, r.cached_prompt_tokens, r.computed_prompt_tokens = 1.0, 32, 8
    doc = json.loads(json.dumps(request_json(r, token_times=True)))
    assert doc["code"] == "OK" and doc["token_times_s"] == [0.1, 0.3, 0.3]
    back = request_from_json(doc)
    assert (back.index, back.ok, back.code, back.prompt_tokens, back.output_tokens) == (7, True, None, 40, 3)
    assert (back.start_s, back.scheduled_s, back.ttft_s, back.e2e_s) == (1.25, 1.0, 0.1, 0.3)
    assert back.tpot_s == r.tpot_s and (back.cached_prompt_tokens, back.computed_prompt_tokens) == (32, 8)
    assert "token_times_s" not in request_json(r)  # only on request: it grows with the output


def test_one_run_at_several_slo_pairs(tmp_path: Path) -> None:
    # four_requests: TTFT 100/200/300 ms and a failure; TPOT 100, 400 ms, none (one token); 2 s long.
    (run,) = load_runs(save(tmp_path / "run.json", [(LoadPoint(LoadMode.CONCURRENCY, 2), four_requests())]))
    report = score({"run.json": [run]}, slo_pairs((250.0, 300.0), (200.0, 500.0)), 90.0)
    got = {(s.slo.ttft_ms, s.slo.tpot_ms): s.attainment for s in report.runs}
    assert list(got) == [(250, 200), (250, 500), (300, 200), (300, 500)]  # every TTFT with every TPOT
    a = got[(250, 200)]  # TTFT: requests 0, 1; TPOT: 0 and 2 (no TPOT meets any); both: 0 alone
    assert (a.ttft_pct, a.tpot_pct, a.both.attainment_pct, a.both.good) == (50.0, 50.0, 25.0, 1)
    assert a.both.requests_per_s == pytest.approx(1 / 2.0)
    a = got[(300, 500)]  # all but the failed one
    assert (a.ttft_pct, a.tpot_pct, a.both.attainment_pct) == (75.0, 75.0, 75.0)
    assert a.both.requests_per_s == pytest.approx(3 / 2.0)
    assert [(w.slo, w.max_load) for w in report.sweeps][0] == (Slo(250, 200), None)  # 25% < 90%


def test_the_score_at_the_runs_own_slo_is_the_goodput_it_saved(tmp_path: Path) -> None:
    slo = Slo(250, 200)
    path = save(tmp_path / "run.json", [(LoadPoint(LoadMode.CONCURRENCY, 2), four_requests())], slo)
    saved = json.loads(path.read_text())["runs"][0]["goodput"]
    (s,) = score({"run.json": load_runs(path)}, [slo], 90.0).runs
    assert (s.attainment.both.good, s.attainment.both.attainment_pct) == (saved["good"], saved["attainment_pct"])
    assert s.attainment.both.requests_per_s == saved["requests_per_s"]


def test_distserve_goodput_is_the_highest_rate_that_still_meets_the_target(tmp_path: Path) -> None:
    runs = load_runs(save(tmp_path / "rates.json", rate_sweep()))
    report = score(group_sweeps(runs, combine=False), [Slo(200, 150), Slo(600, 150), Slo(50, 150)], 90.0)
    assert [s.attainment.ttft_pct for s in report.runs[:3]] == [100.0, 90.0, 80.0]
    assert [s.attainment.tpot_pct for s in report.runs[:3]] == [100.0, 100.0, 100.0]
    # Requests sent one a second, the last answered 0.3 (or 0.7) s after it left at 9 s.
    assert [s.attainment.both.requests_per_s for s in report.runs[:3]] == pytest.approx([10 / 9.3, 9 / 9.7, 8 / 9.7])
    assert [(w.name, w.slo.ttft_ms, w.max_load) for w in report.sweeps] == [
        (str(tmp_path / "rates.json"), 200, 2.0),  # 90% at rate 2 meets a 90% target; 80% at 4 does not
        (str(tmp_path / "rates.json"), 600, 4.0),  # every request meets a 600 ms TTFT
        (str(tmp_path / "rates.json"), 50, None),  # none does a 50 ms one
    ]
    strict = score(group_sweeps(runs, combine=False), [Slo(200, 150)], 95.0)
    assert strict.sweeps[0].max_load == 1.0


def test_a_sweep_split_over_files_is_one_sweep_with_combine(tmp_path: Path) -> None:
    points = rate_sweep()
    files = [save(tmp_path / f"rate{i}.json", [p]) for i, p in enumerate(reversed(points))]
    runs = [r for f in files for r in load_runs(f)]
    assert [w.max_load for w in score(group_sweeps(runs, False), [Slo(200)], 90.0).sweeps] == [None, 2.0, 1.0]
    (combined,) = score(group_sweeps(runs, True), [Slo(200)], 90.0).sweeps
    assert (combined.name, combined.max_load) == (ALL_FILES, 2.0)
    other = save(tmp_path / "conc.json", [(LoadPoint(LoadMode.CONCURRENCY, 8), run_at([0.1]))])
    with pytest.raises(ValueError, match="--combine: the runs are of different load modes"):
        group_sweeps([*runs, *load_runs(other)], True)


def test_the_command_prints_the_scores_and_writes_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rates, out = save(tmp_path / "rates.json", rate_sweep()), tmp_path / "score.json"
    assert run_cli(str(rates), "--slo-ttft-ms", "200,600", "--slo-tpot-ms", "150", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "rate=4" in printed and "80.0" in printed and "goodput (DistServe)" in printed
    doc = json.loads(out.read_text())
    assert doc["tool"] == "pdmesh bench score" and doc["attainment_target_pct"] == 90.0
    assert len(doc["runs"]) == 6 and doc["runs"][2]["attainment_pct"] == {"ttft": 80.0, "tpot": 100.0, "both": 80.0}
    assert [(w["slo"]["ttft_ms"], w["max_load_meeting_target"], w["unit"]) for w in doc["sweeps"]] == [
        (200, 2.0, "requests/s"), (600, 4.0, "requests/s")
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "--slo-ttft-ms / --slo-tpot-ms: give the targets"),
        (("--slo-ttft-ms", "fast"), "--slo-ttft-ms: 'fast' is not a comma-separated list"),
        (("--slo-tpot-ms", "100", "--attainment", "0"), "--attainment: is 0.0"),
    ],
)
def test_bad_flags_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: Any, message: str) -> None:
    rates = save(tmp_path / "rates.json", rate_sweep())
    assert run_cli(str(rates), *argv) == 2
    assert message in capsys.readouterr().err


def test_a_run_without_records_or_another_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare.json"
    doc = json.loads(save(tmp_path / "rates.json", rate_sweep()).read_text())
    del doc["runs"][0]["per_request"]
    bare.write_text(json.dumps(doc))
    assert run_cli(str(bare), "--slo-ttft-ms", "200") == 2
    assert "run rate=1 has no per-request records" in capsys.readouterr().err
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"tool": "pdmesh sim", "runs": []}))
    assert run_cli(str(sim), "--slo-ttft-ms", "200") == 2
    assert "not a `pdmesh bench serve --out` JSON" in capsys.readouterr().err


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "score", *argv])
    return int(exit_.value.code or 0)
