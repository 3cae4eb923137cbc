"""`pdmesh generate --explain`: the TTFT waterfall drawn from a response's Usage."""

from __future__ import annotations

from pdmesh.client import ExecutionPlan, Placement, Usage
from pdmesh.explain import WIDTH, phases, waterfall

USAGE = Usage(
    prompt_tokens=60, completion_tokens=11, cached_prompt_tokens=0, queue_ms=10.0, prefill_ms=50.0,
    transfer_ms=10.0, ttft_ms=100.0, decode_ms=200.0, e2e_ms=300.0, transfer_bytes=4096,
    schedule_ms=20.0, transfer_overlap_ms=5.0,
)  # fmt: skip


def test_the_phases_add_up_to_the_ttft_with_the_hops_as_the_rest() -> None:
    assert phases(USAGE) == [
        ("schedule", 20.0), ("queue", 10.0), ("prefill", 50.0), ("kv wait", 10.0), ("rpc/other", 10.0),
    ]  # fmt: skip


def test_each_bar_starts_where_the_previous_one_ended() -> None:
    placement = Placement(ExecutionPlan.DISAGGREGATED, "prefill-0", "decode-0", 0)
    title, *bars, tail = waterfall(USAGE, placement)
    assert title == "TTFT 100.0 ms  (disaggregated: prefill-0 -> decode-0)"
    spans = []
    for line in bars:
        bar = line.split("|")[1]
        assert len(bar) == WIDTH
        spans.append((len(bar) - len(bar.lstrip()), len(bar.rstrip())))
    assert spans == [(0, 8), (8, 12), (12, 32), (32, 36), (36, 40)]  # 20/10/50/10/10 ms of 100, 40 wide
    assert "(KV push hidden: 5.0 ms)" in bars[2]
    assert tail == "then 10 tokens in 200.0 ms (TPOT 20.00 ms)"
