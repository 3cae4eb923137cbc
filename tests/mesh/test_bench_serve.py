"""`pdmesh bench serve`, the command a user runs, against a live SmolLM2 mesh (1 prefill + 1 decode,
the shared smollm2_mesh), over its gRPC door and its OpenAI HTTP door; and `pdmesh bench profile`,
which records that mesh's profile for `pdmesh sim`.

A short concurrency sweep answers every request with exactly the asked tokens, and its JSON says
so per run and per request; requests the mesh refuses are counted as failed under their status
code, never lost. `pdmesh bench score` judges the saved sweep again at other SLOs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pdmesh.up import Mesh
from services.scheduler.profile import load_profile
from tests.mesh.conftest import SMOLLM2_API_KEY

pytestmark = pytest.mark.slow


def bench(target: str, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pdmesh", "bench", "serve", "--target", target, "--no-progress", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_same_load_over_the_openai_http_door(smollm2_mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "openai.json"
    done = bench(smollm2_mesh.target, "--base-url", f"{smollm2_mesh.spec.http_base_url}/v1", "--api-key",
                 SMOLLM2_API_KEY, "--concurrency", "4", "--requests", "6", "--input-len", "32", "--output-len", "8",
                 "--send-slo", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["server"]["model"] == "smollm2" and report["server"]["max_model_len"] == 8192
    (run,) = report["runs"]
    assert (run["requests"], run["ok"], run["failed"]) == (6, 6, 0), run["errors"]
    assert (run["total_input_tokens"], run["total_output_tokens"]) == (6 * 32, 6 * 8)
    assert run["ttft_ms"]["count"] == 6 and 0 < run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
    # The door's usage says what was cached (OpenAI's prompt_tokens_details), not what was computed.
    assert all(0 <= r["cached_prompt_tokens"] <= 32 and r["computed_prompt_tokens"] is None for r in run["per_request"])


def test_a_concurrency_sweep_answers_every_request(smollm2_mesh: Mesh, tmp_path: Path) -> None:
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    done = bench(smollm2_mesh.target, "--concurrency", "1,4", "--requests", "6", "--input-len", "32",
                 "--output-len", "8", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
                 "--out", str(out), "--plot", str(png))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert "--concurrency 1,4" in report["command"]
    assert report["server"]["model"] == "smollm2"
    assert [r["load"] for r in report["runs"]] == [{"mode": "concurrency", "value": v} for v in (1, 4)]
    for run in report["runs"]:
        assert (run["requests"], run["ok"], run["failed"], run["failed_by_code"]) == (6, 6, 0, {})
        assert (run["total_input_tokens"], run["total_output_tokens"]) == (6 * 32, 6 * 8)
        assert run["ttft_ms"]["count"] == 6 and run["tpot_ms"]["count"] == 6 and run["itl_ms"]["count"] == 6 * 7
        assert 0 < run["ttft_ms"]["p50"] <= run["e2e_ms"]["p50"]
        assert run["output_tokens_per_s"] > 0
        assert run["goodput"]["good"] == 6 and run["goodput"]["attainment_pct"] == 100.0
        records = run["per_request"]  # kept by default: one per request sent
        assert len(records) == run["ok"] + run["failed"] and sorted(r["index"] for r in records) == list(range(6))
        for r in records:
            assert (r["ok"], r["code"], r["prompt_tokens"], r["output_tokens"]) == (True, "OK", 32, 8)
            assert 0 < r["ttft_s"] <= r["e2e_s"] and r["tpot_s"] > 0 and r["start_s"] >= 0
            # The mesh's usage: the prompt's tokens found cached plus those computed make the prompt.
            assert r["cached_prompt_tokens"] + r["computed_prompt_tokens"] == 32
            assert "token_times_s" not in r  # only with --token-times
        limit = run["load"]["value"]
        spans = [(r["start_s"], r["start_s"] + r["e2e_s"]) for r in records]
        assert max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans) == limit  # never more in flight
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scored = score(out, "--slo-ttft-ms", "60000,0.001", "--slo-tpot-ms", "60000")
    for run, at_run_slo, impossible in zip(report["runs"], scored["runs"][:2], scored["runs"][2:], strict=True):
        # At the run's own SLOs the saved records score exactly the goodput the run reported.
        assert at_run_slo["good"] == run["goodput"]["good"] == 6
        assert at_run_slo["goodput_requests_per_s"] == run["goodput"]["requests_per_s"]
        assert impossible["attainment_pct"] == {"ttft": 0.0, "tpot": 100.0, "both": 0.0}  # no TTFT in 1 us
    assert [w["max_load_meeting_target"] for w in scored["sweeps"]] == [4, None]


def score(run_json: Path, *argv: str) -> dict[str, Any]:
    out = run_json.with_suffix(".score.json")
    command = [sys.executable, "-m", "pdmesh", "bench", "score", str(run_json), *argv, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "goodput (DistServe)" in done.stdout
    return dict(json.loads(out.read_text()))


def test_a_trace_replay_sends_every_record_with_its_scaled_lengths(smollm2_mesh: Mesh, tmp_path: Path) -> None:
    trace, out = tmp_path / "trace.jsonl", tmp_path / "trace.json"
    records = [(0, 1000, 40, [1, 2]), (100, 700, 20, [1, 3]), (150, 1500, 40, [4, 5, 6]), (400, 900, 20, [1, 2])]
    trace.write_text("".join(
        json.dumps({"timestamp": t, "input_length": n, "output_length": m, "hash_ids": h}) + "\n"
        for t, n, m, h in records
    ))  # fmt: skip
    done = bench(smollm2_mesh.target, "--trace", str(trace), "--trace-input-scale", "0.0625",
                 "--trace-output-scale", "0.1", "--trace-speedup", "2", "--token-times", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["load"] == {"mode": "trace", "value": 2.0}
    assert (run["requests"], run["ok"], run["failed"]) == (4, 4, 0)
    by_index = sorted(run["per_request"], key=lambda r: r["index"])
    # The mesh's own usage counts: lengths x 1/16 and x 1/10; arrivals at half the trace's times.
    assert [r["prompt_tokens"] for r in by_index] == [62, 44, 94, 56]
    assert [r["output_tokens"] for r in by_index] == [4, 2, 4, 2]
    assert [r["scheduled_s"] for r in by_index] == [0.0, 0.05, 0.075, 0.2]
    for r in by_index:  # --token-times: each token's arrival, the first at TTFT, the last at the end
        times = r["token_times_s"]
        assert len(times) == r["output_tokens"] and times == sorted(times)
        assert (times[0], times[-1]) == (r["ttft_s"], r["e2e_s"])


def test_refused_requests_are_counted_by_status_code(smollm2_mesh: Mesh, tmp_path: Path) -> None:
    out = tmp_path / "refused.json"
    # 9000 prompt tokens exceed SmolLM2's 8192-token context: the scheduler refuses each one.
    done = bench(smollm2_mesh.target, "--concurrency", "2", "--requests", "3", "--input-len", "9000",
                 "--output-len", "4", "--warmup", "0", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["requests"], run["ok"], run["failed"], run["failed_by_code"]) == (3, 0, 3, {"INVALID_ARGUMENT": 3})
    assert "prompt" in run["errors"][0]
    assert [r["code"] for r in run["per_request"]] == ["INVALID_ARGUMENT"] * 3  # failures keep their records too
    assert all(r["ttft_s"] is None and r["e2e_s"] > 0 and "prompt" in r["error"] for r in run["per_request"])
    done = bench(smollm2_mesh.target, "--requests", "1", "--input-len", "9000", "--output-len", "4", "--warmup", "0",
                 "--no-per-request", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["failed"] == 1 and "per_request" not in run


def test_an_unreachable_target_is_a_clear_error(tmp_path: Path) -> None:
    done = bench("127.0.0.1:1", "--requests", "1", "--timeout-s", "5")
    assert done.returncode == 2
    assert "error:" in done.stderr and "UNAVAILABLE" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_profile_recorded_from_the_live_mesh_drives_the_simulator(smollm2_mesh: Mesh, tmp_path: Path) -> None:
    recorded, out = tmp_path / "mesh-profile.json", tmp_path / "sim.json"
    done = subprocess.run([sys.executable, "-m", "pdmesh", "bench", "profile", "--target", smollm2_mesh.target,
                           "--out", str(recorded), "--max-prompt", "64", "--concurrency", "1,2", "--decode-tokens",
                           "4", "--shared-cores", "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The scheduler's models of the live workers, fitted to the steps they reported (non-negative
    # fits: a step of either kind takes time), and what the workers registered.
    profile = load_profile(str(recorded))
    assert (profile.name, profile.model, profile.shared_cores) == ("mesh-profile", "smollm2", 2.0)
    assert profile.step.prefill_ms(64, 0, profile.prefill.max_batched_tokens) > 0
    assert profile.step.decode_step_ms(1, 64) > 0
    assert profile.kv_bytes_per_token > 0 and profile.decode.kv_capacity_tokens > 0

    simulated = subprocess.run([sys.executable, "-m", "pdmesh", "sim", "--profile", str(recorded), "--prefill", "1",
                                "--decode", "1", "--requests", "40", "--input-len", "16:64", "--output-len", "4:16",
                                "--rate", "1", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--policy",
                                "least_loaded,slo", "--out", str(out), "--no-progress"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert simulated.returncode == 0, simulated.stderr
    doc = json.loads(out.read_text())
    assert doc["profile"]["name"] == "mesh-profile" and doc["profile"]["source"] == profile.source
    assert [(r["policy"], r["requests"], r["ok"]) for r in doc["runs"]] == [("least_loaded", 40, 40), ("slo", 40, 40)]
