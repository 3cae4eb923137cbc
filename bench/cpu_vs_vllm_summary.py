"""The table of a bench/cpu_vs_vllm.sh run: per server and concurrency, output tokens/s (median
over rounds, every round's figure beside it), requests ok/failed, TTFT and TPOT p50, and each
pdmesh mesh's throughput over vLLM's at the same concurrency.

    python bench/cpu_vs_vllm_summary.py bench/results/cpu_vs_vllm/<run>
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

NAMES = {
    "vllm-vllmbench": "vLLM (vllm bench serve)",
    "vllm-pdmeshbench": "vLLM (pdmesh bench serve --base-url)",
    "coloc": "pdmesh colocated (0 prefill + 1 decode)",
    "disagg": "pdmesh disaggregated (1 prefill + 1 decode)",
}
FILE = re.compile(r"(?P<server>[a-z-]+)-c(?P<c>\d+)-r(?P<round>\d+)\.json$")


@dataclass(frozen=True)
class Run:
    ok: int
    failed: int
    tokens_per_s: float
    ttft_p50_ms: float
    tpot_p50_ms: float


def read(path: Path) -> Run:
    doc = json.loads(path.read_text())
    if "runs" in doc:  # pdmesh bench serve
        r = doc["runs"][0]
        return Run(r["ok"], r["failed"], r["output_tokens_per_s"], r["ttft_ms"]["p50"], r["tpot_ms"]["p50"])
    failed = doc.get("failed", doc["num_prompts"] - doc["completed"])  # vllm bench serve
    return Run(doc["completed"], failed, doc["output_throughput"], doc["median_ttft_ms"], doc["median_tpot_ms"])


def main() -> None:
    out = Path(sys.argv[1])
    runs: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for path in sorted(out.glob("*.json")):
        m = FILE.search(path.name)
        if m is not None:
            runs[(m["server"], int(m["c"]))].append(read(path))
    concurrencies = sorted({c for _, c in runs})
    print("| server | concurrency | out tok/s (median; rounds) | ok / failed | TTFT p50 ms | TPOT p50 ms | vs vLLM |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for c in concurrencies:
        base = runs.get(("vllm-vllmbench", c))
        base_tps = statistics.median(r.tokens_per_s for r in base) if base else None
        for server, label in NAMES.items():
            rs = runs.get((server, c))
            if not rs:
                continue
            tps = statistics.median(r.tokens_per_s for r in rs)
            each = ", ".join(f"{r.tokens_per_s:.1f}" for r in rs)
            ratio = f"{tps / base_tps:.2f}x" if base_tps and server != "vllm-vllmbench" else ""
            print(
                f"| {label} | {c} | **{tps:.1f}** ({each}) | {sum(r.ok for r in rs)} / {sum(r.failed for r in rs)} "
                f"| {statistics.median(r.ttft_p50_ms for r in rs):,.0f} "
                f"| {statistics.median(r.tpot_p50_ms for r in rs):.1f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
