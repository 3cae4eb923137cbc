"""`pdmesh generate --explain`: where a request's time to first token went, as a small waterfall
drawn from what the last response already carries (Usage and Placement), no tracing needed.

    TTFT 84.2 ms  (disaggregated: prefill-0 -> decode-0)
      schedule   |█                                       |    3.1 ms
      queue      | █                                      |    0.9 ms
      prefill    |  █████████████████████████████         |   61.0 ms  (KV push hidden: 7.9 ms)
      kv wait    |                               ██       |    5.2 ms
      rpc/other  |                                 ███████|   14.0 ms
    then 63 tokens in 512.0 ms (TPOT 8.13 ms)

The phases are the scheduler's (placement and reservation), the computing worker's queue and
compute, the KV transfer not hidden behind compute, and what is left: the gRPC hops.
"""

from __future__ import annotations

from pdmesh.client import Placement, Usage

WIDTH = 40


def phases(usage: Usage) -> list[tuple[str, float]]:
    """(name, ms) of each TTFT phase in order; the last is what the others leave of the TTFT."""
    named = [
        ("schedule", usage.schedule_ms), ("queue", usage.queue_ms), ("prefill", usage.prefill_ms),
        ("kv wait", usage.transfer_ms),
    ]  # fmt: skip
    return [*named, ("rpc/other", max(0.0, usage.ttft_ms - sum(ms for _, ms in named)))]


def waterfall(usage: Usage, placement: Placement | None = None) -> list[str]:
    """The lines to print."""
    scale = WIDTH / max(usage.ttft_ms, sum(ms for _, ms in phases(usage)), 1e-9)
    lines = [f"TTFT {usage.ttft_ms:.1f} ms{_where(placement)}"]
    start = 0.0
    for name, ms in phases(usage):
        left, right = round(start * scale), round((start + ms) * scale)
        bar = " " * left + "█" * max(right - left, 1 if ms > 0 else 0)
        note = (
            f"  (KV push hidden: {usage.transfer_overlap_ms:.1f} ms)"
            if name == "prefill" and usage.transfer_overlap_ms
            else ""
        )
        lines.append(f"  {name:<10} |{bar:<{WIDTH}}| {ms:6.1f} ms{note}")
        start += ms
    if usage.completion_tokens > 1:
        decode_ms = usage.e2e_ms - usage.ttft_ms
        tpot = decode_ms / (usage.completion_tokens - 1)
        lines.append(f"then {usage.completion_tokens - 1} tokens in {decode_ms:.1f} ms (TPOT {tpot:.2f} ms)")
    return lines


def _where(placement: Placement | None) -> str:
    if placement is None or placement.plan is None:
        return ""
    workers = " -> ".join(w for w in (placement.prefill_worker_id, placement.decode_worker_id) if w)
    return f"  ({placement.plan.value}: {workers})"
