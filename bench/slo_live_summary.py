"""The live SLO comparison (bench/slo_live.sh) as BENCHMARKS.md reads it: per policy and load, the
requests admitted and refused (at once? with a retry hint, or OUT_OF_RANGE: out of reach even on
idle workers?), the share of admitted requests meeting
both SLOs, and the TTFT/TPOT percentiles live beside `pdmesh sim`'s with the mesh's recorded
profiles (the simulator's truth check: sim / live ratios).

    python bench/slo_live_summary.py bench/results/slo_live
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def live_rows(path: Path, policy: str) -> list[str]:
    doc = json.loads(path.read_text())
    slo = doc["runs"][0]["goodput"]["slo"]
    rows = []
    for run in doc["runs"]:
        reqs = run["per_request"]
        ok = [r for r in reqs if r["ok"]]
        refused = [r for r in reqs if r["code"] in ("RESOURCE_EXHAUSTED", "OUT_OF_RANGE")]
        hinted = [r for r in refused if "retry in" in (r.get("error") or "")]
        out_of_reach = sum(1 for r in refused if r["code"] == "OUT_OF_RANGE")
        met = [r for r in ok if _meets(r, slo)]
        slowest = max((r["e2e_s"] for r in refused), default=0.0)
        load = run["load"]["value"]
        rows.append(
            f"| {policy} | {load} | {len(reqs)} | {len(ok)} | {len(refused)} ({len(hinted)} with a hint, "
            f"{out_of_reach} out of reach) "
            f"| {slowest * 1000:.0f} | {100 * len(met) / max(1, len(ok)):.0f}% | {100 * len(met) / len(reqs):.0f}% |"
        )
    return rows


def _meets(r: dict[str, Any], slo: dict[str, float]) -> bool:
    ttft_ok = r["ttft_s"] is not None and r["ttft_s"] * 1000 <= slo["ttft_ms"]
    return ttft_ok and (r["tpot_s"] is None or r["tpot_s"] * 1000 <= slo["tpot_ms"])


def percentiles(run: dict[str, Any]) -> tuple[float, ...]:
    t, p = run["ttft_ms"], run["tpot_ms"]
    return (t["p50"], t["p90"], t["p99"], p["p50"], p["p90"], p["p99"])


def truth_rows(out: Path) -> list[str]:
    live = {}
    for policy, name in (("least_loaded", "least.json"), ("slo", "slo.json")):
        if not (out / name).is_file():
            continue  # SLO_MESH=0: no slo mesh ran
        for run in json.loads((out / name).read_text())["runs"]:
            live[(policy, float(run["load"]["value"]))] = percentiles(run)
    rows = []
    for sim_file in sorted(out.glob("sim*.json")):
        for run in json.loads(sim_file.read_text())["runs"]:
            key = (run["policy"], float(run["load"]))
            if key not in live:
                continue
            s, lv = percentiles(run), live[key]
            ratios = " | ".join(f"{a:.0f} / {b:.0f} ({a / b:.2f})" for a, b in zip(s, lv, strict=True))
            rows.append(f"| {sim_file.stem} | {key[0]} | {key[1]} | {ratios} |")
    return rows


def main(out: Path) -> None:
    print("| policy | trace speed-up | requests | admitted | refused (hinted, out of reach) | slowest refusal ms | "
          "admitted meeting both SLOs | all meeting both |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, name in (("least_loaded", "least.json"), ("slo", "slo.json")):
        if not (out / name).is_file():
            continue
        for row in live_rows(out / name, policy):
            print(row)
    print()
    print("| sim profile | policy | speed-up | TTFT p50 sim / live (ratio) | TTFT p90 | TTFT p99 | TPOT p50 | "
          "TPOT p90 | TPOT p99 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in truth_rows(out):
        print(row)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
