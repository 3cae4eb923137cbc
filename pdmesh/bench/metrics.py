"""From per-request results to one run's figures.

Definitions (the ones vLLM's and SGLang's serving benchmarks use, so figures compare):
- TTFT: from sending the request to the first chunk that carries a token.
- E2E: from sending the request to the chunk carrying its last token.
- TPOT of a request: (E2E - TTFT) / (output tokens - 1); undefined (left out of TPOT percentiles,
  and counted as meeting any TPOT SLO) for a one-token answer.
- ITL: the gaps between consecutive token-bearing chunks; a chunk carrying k tokens contributes k
  gaps of (its gap / k), as SGLang's benchmark does, so a request's ITLs sum to E2E - TTFT.
- Output tokens/s and request rate: over the run's duration, first send to last answer (or
  failure); only successful requests count.
- Goodput (DistServe): successful requests per second that met both the TTFT and the TPOT SLO;
  attainment: the share of *all* requests sent that did (a failed request is a miss). Across a
  sweep, DistServe's goodput is the highest load up to which every load tried reaches a target (90%).
Percentiles interpolate linearly between samples (numpy's default, as vLLM's benchmark).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it; times in seconds from the start of its run."""

    index: int
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    scheduled_s: float | None = None  # when an open-loop load wanted it sent (its arrival time)
    start_s: float = 0.0  # when it was sent
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    code: str | None = None  # on failure: a gRPC status name, an HTTP status, or the backend's own name
    error: str = ""
    finish_reason: str | None = None
    # Each output token's arrival, seconds after sending (a chunk's tokens share its arrival).
    token_times_s: list[float] = field(default_factory=list)
    # What the server's usage said of the prompt, when it says: tokens found cached, and computed.
    cached_prompt_tokens: int | None = None
    computed_prompt_tokens: int | None = None

    def add_chunk(self, num_tokens: int, at_s: float) -> None:
        """A chunk of `num_tokens` tokens arrived `at_s` seconds after the request was sent."""
        if num_tokens <= 0:
            return
        if self.ttft_s is None:
            self.ttft_s = at_s
        else:
            gap = at_s - (self.e2e_s or 0.0)
            self.itl_s.extend([gap / num_tokens] * num_tokens)
        self.token_times_s.extend([at_s] * num_tokens)
        self.output_tokens += num_tokens
        self.e2e_s = at_s

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float:
        return self.start_s + (self.e2e_s or 0.0)


@dataclass(frozen=True)
class Slo:
    """Targets a request must meet to count towards goodput; None means no target."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1000 > self.ttft_ms):
            return False
        tpot = r.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1000 <= self.tpot_ms


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency in milliseconds; all None when there were no samples."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of_seconds(cls, samples: list[float]) -> Distribution:
        if not samples:
            return cls(0, None, None, None, None, None)
        ms = np.asarray(samples, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(len(samples), float(ms.mean()), p50, p90, p99, float(ms.max()))


@dataclass(frozen=True)
class Goodput:
    slo: Slo
    good: int  # requests that met every target
    requests_per_s: float
    attainment_pct: float  # good / all requests sent


@dataclass(frozen=True)
class RunMetrics:
    """The figures of one load point. `ok + failed` is the number of requests sent."""

    requests: int
    ok: int
    failed: int
    failed_by_code: dict[str, int]
    duration_s: float
    request_rate: float  # successful requests per second
    output_tokens_per_s: float
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    # Open loops: how late requests left against their arrival times (a capped or overloaded client).
    send_lag_ms: Distribution
    goodput: Goodput | None
    errors: list[str]  # the first distinct failure messages, for a reader to see what went wrong


MAX_ERRORS_KEPT = 5


def summarize(results: list[RequestResult], slo: Slo | None = None) -> RunMetrics:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    duration = _duration(results)
    out_tokens = sum(r.output_tokens for r in ok)
    return RunMetrics(
        requests=len(results),
        ok=len(ok),
        failed=len(failed),
        failed_by_code=dict(Counter(r.code or "UNKNOWN" for r in failed)),
        duration_s=duration,
        request_rate=len(ok) / duration if duration > 0 else 0.0,
        output_tokens_per_s=out_tokens / duration if duration > 0 else 0.0,
        total_input_tokens=sum(r.prompt_tokens for r in ok),
        total_output_tokens=out_tokens,
        ttft_ms=Distribution.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=Distribution.of_seconds([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=Distribution.of_seconds([g for r in ok for g in r.itl_s]),
        e2e_ms=Distribution.of_seconds([r.e2e_s for r in ok if r.e2e_s is not None]),
        send_lag_ms=Distribution.of_seconds(
            [max(0.0, r.start_s - r.scheduled_s) for r in results if r.scheduled_s is not None]
        ),
        goodput=goodput(results, slo, duration) if slo is not None and slo.is_set else None,
        errors=list(dict.fromkeys(f"{r.code}: {r.error}" for r in failed))[:MAX_ERRORS_KEPT],
    )


def goodput(results: list[RequestResult], slo: Slo, duration_s: float) -> Goodput:
    good = sum(1 for r in results if slo.met_by(r))
    return Goodput(
        slo=slo,
        good=good,
        requests_per_s=good / duration_s if duration_s > 0 else 0.0,
        attainment_pct=100.0 * good / len(results) if results else 0.0,
    )


@dataclass(frozen=True)
class Attainment:
    """One run judged at one SLO pair: the share of all requests sent meeting each target alone,
    and both (whose goodput is the run's goodput at these SLOs)."""

    ttft_pct: float
    tpot_pct: float
    both: Goodput


def attainment(results: list[RequestResult], slo: Slo) -> Attainment:
    """`results` at `slo`, each target alone and both (the same test `summarize` applies)."""
    duration = _duration(results)
    return Attainment(
        ttft_pct=goodput(results, Slo(slo.ttft_ms, None), duration).attainment_pct,
        tpot_pct=goodput(results, Slo(None, slo.tpot_ms), duration).attainment_pct,
        both=goodput(results, slo, duration),
    )


def max_load_meeting(points: list[tuple[float, float]], target_pct: float) -> float | None:
    """DistServe's goodput over a sweep: of (load, attainment %) points, the highest load up to
    which every load tried reaches `target_pct`; None when the lowest does not. A load that misses
    caps it even where a higher one passes: on a finite sample attainment need not fall
    monotonically with load, and a lucky higher point is not a rate the system sustains."""
    best = None
    for load, pct in sorted(points):
        if pct < target_pct:
            break
        best = load
    return best


def _duration(results: list[RequestResult]) -> float:
    """First send to last answer (or failure), in seconds."""
    if not results:
        return 0.0
    return max(r.end_s for r in results) - min(r.start_s for r in results)
