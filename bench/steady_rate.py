"""Output tokens/s of a closed-loop `pdmesh bench serve` run while every slot was in use.

A closed loop of C slots over N requests ramps up (the first C prompts queue for their first
tokens together) and drains (the last requests finish one by one, nothing replacing them): over
the whole run, first send to last answer, its rate is partly the rate of fewer than C requests.
Issue 15's target ("output tokens/s at 64 concurrent") is the pace with 64 in flight, so this
reads it from the run's per-request records, between

- start: when the last of the first C requests got its first token (every slot has been served
  once: the first wave's queue is behind), and
- end: when the last request was sent (from then on a finished request is not replaced),

counting each output token whose arrival falls inside: its exact time with `--token-times`,
otherwise the request's tokens after the first spread evenly between its first token and its last.
A request's refill gap (its own TTFT, during which its slot decodes nothing) is inside the window
and counts against the rate, as it should. The whole-run rate is printed beside it.

    python bench/steady_rate.py run.json [more.json ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.bench.metrics import RequestResult  # noqa: E402
from pdmesh.bench.plan import LoadMode  # noqa: E402
from pdmesh.bench.score import SavedRun, load_runs  # noqa: E402


def token_arrivals(r: RequestResult) -> list[float]:
    """Each output token's arrival, seconds from the run's start (spread evenly without token times)."""
    if not r.ok or r.ttft_s is None or r.e2e_s is None or r.output_tokens == 0:
        return []
    if len(r.token_times_s) == r.output_tokens:
        return [r.start_s + t for t in r.token_times_s]
    n = r.output_tokens
    first, last = r.start_s + r.ttft_s, r.start_s + r.e2e_s
    return [first] + [first + (last - first) * i / (n - 1) for i in range(1, n)]


def full_window(results: list[RequestResult], slots: int) -> tuple[float, float] | None:
    """(start, end) of the span with every slot in use, or None when the run had no such span."""
    by_send = sorted(results, key=lambda r: r.start_s)
    first_wave = by_send[:slots]
    if len(by_send) <= slots or any(r.ttft_s is None for r in first_wave):
        return None
    start = max(r.start_s + (r.ttft_s or 0.0) for r in first_wave)
    end = by_send[-1].start_s
    return (start, end) if end > start else None


def steady_rate(run: SavedRun) -> tuple[float, float, float] | None:
    """(output tokens/s in the full window, the window's length s, its share of the run's tokens)."""
    if run.point.mode is not LoadMode.CONCURRENCY:
        return None
    window = full_window(run.results, int(run.point.value))
    if window is None:
        return None
    start, end = window
    arrivals = [t for r in run.results for t in token_arrivals(r)]
    inside = sum(1 for t in arrivals if start <= t < end)
    return inside / (end - start), end - start, inside / max(1, len(arrivals))


def whole_rate(run: SavedRun) -> float:
    ends = [r.start_s + r.e2e_s for r in run.results if r.e2e_s is not None]
    begin = min(r.start_s for r in run.results)
    tokens = sum(r.output_tokens for r in run.results if r.ok)
    return tokens / (max(ends) - begin) if ends else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="pdmesh bench serve --out JSON files")
    args = parser.parse_args()
    for path in args.runs:
        for run in load_runs(path):
            steady = steady_rate(run)
            head = f"{path.name} {run.point.label}: whole run {whole_rate(run):,.0f} out tok/s"
            if steady is None:
                print(f"{head}; no span with every slot in use (not a closed loop, or too few requests)")
                continue
            rate, seconds, share = steady
            print(f"{head}; every slot in use {rate:,.0f} out tok/s over {seconds:.1f} s ({share:.0%} of the tokens)")


if __name__ == "__main__":
    main()
