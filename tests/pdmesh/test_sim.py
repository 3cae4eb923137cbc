"""`pdmesh sim`: deterministic for a seed, the scheduler's own policies deciding, its figures and
files as a user reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdmesh.bench.metrics import Slo
from pdmesh.bench.trace import TraceScaling, load_trace
from pdmesh.bench.workload import LengthRange
from pdmesh.cli import main
from pdmesh.config import PolicyName, SloConfig
from pdmesh.sim.mesh import MeshSpec
from pdmesh.sim.run import Run, SearchSettings, search_goodput, simulate
from pdmesh.sim.workload import at_rate, at_speedup, drawn_shapes, trace_shapes
from services.scheduler.profile import H100_LLAMA_8B

ROOT = Path(__file__).resolve().parents[2]
# The shared trace sits beside the checkout (../shared), or beside the worktrees' folder.
TRACE = next(
    (p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if (p / "traces").is_dir()), ROOT / "shared"
) / "traces" / "mooncake_synthetic_trace.jsonl"
SLO = Slo(ttft_ms=1500, tpot_ms=60)


def spec(seed: int = 0) -> MeshSpec:
    return MeshSpec(H100_LLAMA_8B, 2, 2, 512, SloConfig(default_ttft_ms=1500, default_tpot_ms=60), seed=seed)


def requests(seed: int = 0, rate: float = 6.0):
    shapes = drawn_shapes(300, LengthRange(500, 12_000), LengthRange(20, 300), 512, seed)
    return at_rate(shapes, rate, burstiness=0.5, seed=seed)


def fingerprint(run) -> list[tuple]:
    return [(r.index, r.ok, r.code, r.ttft_s, r.e2e_s) for r in run.results]


@pytest.mark.parametrize("policy", list(PolicyName))
def test_the_same_seed_gives_the_same_run(policy: PolicyName) -> None:
    first = simulate(spec(), policy, 6.0, requests(), SLO)
    again = simulate(spec(), policy, 6.0, requests(), SLO)

    assert fingerprint(first) == fingerprint(again)
    assert first.metrics.requests == 300
    other = simulate(spec(seed=1), policy, 6.0, requests(seed=1), SLO)
    assert fingerprint(other) != fingerprint(first)


def test_under_overload_slo_refuses_at_once_and_what_it_admits_meets_the_slo() -> None:
    load = requests(rate=12.0)  # about twice what two prefill and two decode H100s sustain here
    least = simulate(spec(), PolicyName.LEAST_LOADED, 12.0, load, SLO)
    slo = simulate(spec(), PolicyName.SLO, 12.0, load, SLO)

    # least_loaded admits; what it cannot hold waits for KV and fails only when its TTFT is gone.
    assert least.attainment_pct < 50
    assert all(r.e2e_s and r.e2e_s > 0.5 for r in least.results if not r.ok)
    # slo refuses at once (no simulated time passes), and what it admits meets the SLO.
    refused = [r for r in slo.results if not r.ok]
    assert len(refused) > 30 and {(r.code, r.e2e_s) for r in refused} == {("RESOURCE_EXHAUSTED", 0.0)}
    admitted = [r for r in slo.results if r.ok]
    assert sum(SLO.met_by(r) for r in admitted) >= 0.9 * len(admitted)
    assert slo.attainment_pct > least.attainment_pct


@pytest.mark.skipif(not TRACE.is_file(), reason="the shared Mooncake trace is not here")
def test_a_mooncake_trace_replays_with_its_prefixes_shared() -> None:
    records = load_trace(TRACE, limit=200)
    shapes = trace_shapes(records, TraceScaling(input_scale=0.25), 400)  # past its end: a second copy

    assert shapes[0].blocks[:3] == tuple(records[0].hash_ids[:3])
    assert not set(shapes[200].blocks) & set(shapes[0].blocks)  # the copy shares nothing with the first
    run = simulate(spec(), PolicyName.SLO, 2.0, at_speedup(shapes, 2.0), SLO)
    assert run.metrics.requests == 400 and run.decisions.count == 400


def test_the_command_writes_its_json_and_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    with pytest.raises(SystemExit) as ended:
        main([
            "sim", "--prefill", "2", "--decode", "2", "--requests", "120", "--input-len", "500:6000",
            "--output-len", "20:200", "--rate", "2,8", "--slo-ttft-ms", "1500", "--slo-tpot-ms", "60",
            "--policy", "least_loaded,slo", "--out", str(out), "--plot", str(plot), "--no-progress",
        ])  # fmt: skip

    assert ended.value.code == 0
    doc = json.loads(out.read_text())
    assert [(r["policy"], r["load"]) for r in doc["runs"]] == [("least_loaded", 2), ("least_loaded", 8), ("slo", 2),
                                                                  ("slo", 8)]  # fmt: skip
    run = doc["runs"][0]
    assert set(run["attainment_pct"]) == {"ttft", "tpot", "both"} and run["requests"] == 120
    assert run["decision_latency_us"]["count"] == 120
    assert set(doc["goodput_requests_per_s"]) == {"least_loaded", "slo"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_flag_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["sim", "--policy", "fastest", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1", "--no-progress"])

    assert ended.value.code == 2
    assert "--policy: 'fastest' is not one of" in capsys.readouterr().err


def test_workers_sharing_one_simulated_gpu_serve_bursts_as_the_colocated_mesh_does() -> None:
    # 4k prompts in gamma bursts (4 req/s, shape 0.25) on 1 prefill + 1 decode worker time-slicing
    # one GPU (--gpus 1): the slo policy forecasts them as one device and serves the load as one
    # worker alone on that GPU does (blind to the sharing it spread bursts over both: TPOT p90 2x);
    # the run is the same for the same seed.
    shapes = drawn_shapes(200, LengthRange(4096, 4096), LengthRange(32, 32), 512, 0)
    load = at_rate(shapes, 4.0, burstiness=0.25, seed=0)
    slo = SloConfig(default_ttft_ms=30_000, default_tpot_ms=0)

    def run(num_prefill: int) -> Run:
        mesh = MeshSpec(H100_LLAMA_8B, num_prefill, 1, 512, slo, gpus=1)
        return simulate(mesh, PolicyName.SLO, 4.0, load, Slo(30_000, None))

    shared, again, colocated = run(1), run(1), run(0)
    assert fingerprint(shared) == fingerprint(again)
    assert shared.metrics.ttft_ms.p50 == pytest.approx(colocated.metrics.ttft_ms.p50, rel=0.05)
    assert shared.metrics.tpot_ms.p90 == pytest.approx(colocated.metrics.tpot_ms.p90, rel=0.1)


def test_a_closed_loop_keeps_its_concurrency_in_flight() -> None:
    # As `pdmesh bench serve --concurrency 3`: three sent at once, each next one as one ends.
    shapes = drawn_shapes(12, LengthRange(1024, 1024), LengthRange(8, 8), 512, 0)
    mesh = MeshSpec(H100_LLAMA_8B, 1, 1, 512, SloConfig(default_ttft_ms=30_000, default_tpot_ms=0))

    run = simulate(mesh, PolicyName.SLO, 3, at_speedup(shapes, 1.0), Slo(30_000, None), None, concurrency=3)

    assert all(r.ok for r in run.results) and len(run.results) == 12
    spans = sorted((r.start_s, r.start_s + (r.e2e_s or 0.0)) for r in run.results)
    ends = {round(end, 9) for _, end in spans}
    assert [start for start, _ in spans[:3]] == [0.0] * 3
    assert all(round(start, 9) in ends for start, _ in spans[3:])  # sent when one ended
    assert max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans) == 3


def test_a_closed_loop_has_no_rate_to_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        main(["sim", "--concurrency", "16", "--sweep", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1", "--no-progress"])

    assert ended.value.code == 2
    assert "--concurrency: a closed loop; drop --sweep" in capsys.readouterr().err


@dataclass(frozen=True)
class _Point:
    """What search_goodput reads of a run: its load and the share meeting both SLOs."""

    load: float
    attainment_pct: float


def _cliff(at: float):
    """Every request meets both SLOs up to `at` requests/s, none beyond; the loads tried, in order."""
    tried: list[float] = []

    def run(load: float) -> _Point:
        tried.append(load)
        return _Point(load, 100.0 if load <= at else 0.0)

    return run, tried


def test_the_sweep_doubles_to_a_miss_then_bisects_in_the_log_to_the_goodput() -> None:
    run, tried = _cliff(5.0)
    best, runs = search_goodput(run, SearchSettings(start=1.0, bisections=5))

    assert tried[:4] == [1.0, 2.0, 4.0, 8.0] and len(runs) == len(tried) == 9
    assert best is not None and best <= 5.0 < best * 2 ** (1 / 32)  # 4..8 halved in the log 5 times
    # Started past the cliff it halves down to a load that meets the target, then bisects up.
    run, tried = _cliff(5.0)
    assert search_goodput(run, SearchSettings(start=20.0))[0] == 5.0 and tried[:3] == [20.0, 10.0, 5.0]
    # A target no load meets has no goodput (DistServe's is undefined), after max_doublings halvings.
    run, tried = _cliff(0.0)
    assert search_goodput(run, SearchSettings(start=1.0, max_doublings=4)) == (None, [_Point(1.0, 0.0),
        _Point(0.5, 0.0), _Point(0.25, 0.0), _Point(0.125, 0.0)])  # fmt: skip


def test_the_command_sweeps_each_policys_goodput_and_shows_its_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep.json"
    with pytest.raises(SystemExit) as ended:
        main([
            "sim", "--prefill", "1", "--decode", "1", "--requests", "60", "--input-len", "500:4000",
            "--output-len", "20:200", "--rate", "1", "--sweep", "--slo-ttft-ms", "1500", "--slo-tpot-ms", "60",
            "--policy", "round_robin,slo", "--out", str(out),
        ])  # fmt: skip

    assert ended.value.code == 0
    doc = json.loads(out.read_text())
    for policy in ("round_robin", "slo"):
        runs = [r for r in doc["runs"] if r["policy"] == policy]
        met = [r["load"] for r in runs if r["attainment_pct"]["both"] >= 90.0]
        goodput = doc["goodput_requests_per_s"][policy]
        # The highest rate tried at which >= 90% met both SLOs, with a miss tried above it.
        assert met and goodput == max(met)
        assert any(r["load"] > goodput and r["attainment_pct"]["both"] < 90.0 for r in runs)
    # Not on a terminal: a line per finished run instead of a bar.
    err = capsys.readouterr().err
    assert err.count(": 60 requests simulated in ") == len(doc["runs"])
    assert "goodput (90% meeting both SLOs) of round_robin:" in err
