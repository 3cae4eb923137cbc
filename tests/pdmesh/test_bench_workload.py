"""What `pdmesh bench serve` sends: seeded prompts and lengths, arrival processes, traces whose
shared prefixes survive scaling, and the command line that chooses among them."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pdmesh.bench.arrivals import arrival_times, time_scaled
from pdmesh.bench.backend import Api
from pdmesh.bench.cli import add_bench_parser, plan_from_args
from pdmesh.bench.plan import LoadMode
from pdmesh.bench.trace import TraceRecord, TraceScaling, load_trace, trace_requests
from pdmesh.bench.workload import LengthRange, PromptKind, RequestClass, SyntheticWorkload, Vocabulary

# shared/ lies beside the repository (as in CI: a copy of it beside the clone).
SHARED_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"
VOCAB = Vocabulary(1000, frozenset({0, 1, 999}))


def test_lengths_parse_fixed_or_a_range_and_name_the_flag() -> None:
    assert LengthRange.parse("256", "--input-len") == LengthRange(256, 256)
    assert LengthRange.parse("128:512", "--input-len") == LengthRange(128, 512)
    for bad in ("0", "abc", "5:2", "1:2:3"):
        with pytest.raises(ValueError, match="--input-len"):
            LengthRange.parse(bad, "--input-len")


def test_synthetic_prompts_are_seeded_in_range_and_free_of_special_ids() -> None:
    work = SyntheticWorkload(50, LengthRange(8, 64), LengthRange(4, 4))
    a, b = work.build(VOCAB, seed=3), work.build(VOCAB, seed=3)
    assert a == b
    assert a != work.build(VOCAB, seed=4)
    assert all(8 <= r.prompt_len <= 64 and len(r.prompt) == r.prompt_len and r.output_len == 4 for r in a)
    assert len({r.prompt_len for r in a}) > 10  # drawn, not fixed
    ids = {t for r in a for t in r.prompt}
    assert ids.isdisjoint(VOCAB.special_ids) and ids <= set(range(1000))


def test_shared_prefixes_start_every_prompt_of_their_group() -> None:
    work = SyntheticWorkload(6, LengthRange(10, 10), LengthRange(4, 4), prefix_len=20, prefix_groups=2)
    reqs = work.build(VOCAB, seed=5)
    assert [r.prompt_len for r in reqs] == [30] * 6
    group0 = {r.prompt[:20] for r in reqs[0::2]}
    group1 = {r.prompt[:20] for r in reqs[1::2]}
    assert len(group0) == len(group1) == 1 and group0 != group1
    assert len({r.prompt[20:] for r in reqs}) == 6  # each request's own tokens differ


def test_a_mix_draws_each_request_from_one_class_by_weight() -> None:
    mix = RequestClass.parse_mix("100:120/4, 10/50:60@3")
    assert mix == (
        RequestClass(LengthRange(100, 120), LengthRange(4, 4), 1.0),
        RequestClass(LengthRange(10, 10), LengthRange(50, 60), 3.0),
    )
    work = SyntheticWorkload(400, LengthRange(1, 1), LengthRange(1, 1), mix=mix)
    reqs = work.build(VOCAB, seed=1)
    assert reqs == work.build(VOCAB, seed=1)
    long_prompts = [r for r in reqs if r.prompt_len >= 100]
    long_outputs = [r for r in reqs if r.prompt_len == 10]
    assert len(long_prompts) + len(long_outputs) == 400  # every request is one class's, never a blend
    assert all(r.output_len == 4 for r in long_prompts) and all(50 <= r.output_len <= 60 for r in long_outputs)
    assert 60 <= len(long_prompts) <= 140  # weight 1 of 4: ~100 of 400
    assert len({r.prompt_len for r in long_prompts}) > 5 and len({r.output_len for r in long_outputs}) > 5


def test_the_command_line_takes_a_mix_and_records_it() -> None:
    plan = plan_from_args(parse("--rate", "2", "--requests", "20", "--mix", "2048/16,64/256@2"))
    assert [str(c) for c in plan.mix] == ["2048/16@1", "64/256@2"]
    assert {(r.prompt_len, r.output_len) for r in plan.requests(0, VOCAB)} == {(2048, 16), (64, 256)}
    recorded = plan.to_json()["mix"][1]
    assert recorded == {"input_len": {"low": 64, "high": 64}, "output_len": {"low": 256, "high": 256}, "weight": 2.0}


def test_text_prompts_need_a_tokenizer() -> None:
    with pytest.raises(ValueError, match="--tokenizer"):
        SyntheticWorkload(1, LengthRange(8, 8), LengthRange(4, 4), PromptKind.TEXT).build(VOCAB, seed=0)


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate() -> None:
    times = arrival_times(20000, rate=50.0, seed=11)
    assert times == arrival_times(20000, rate=50.0, seed=11)
    assert times != arrival_times(20000, rate=50.0, seed=12)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    bursty = np.diff(arrival_times(20000, rate=50.0, seed=11, burstiness=0.25))
    assert bursty.mean() == pytest.approx(1 / 50.0, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma shape k: CV 1/sqrt(k)
    assert arrival_times(3, rate=math.inf, seed=0) == [0.0, 0.0, 0.0]


def records() -> list[TraceRecord]:
    return [
        TraceRecord(1000.0, 1200, 10, (7, 8, 9)),  # 3 blocks of 512, the last one partial
        TraceRecord(1500.0, 1024, 20, (7, 8)),  # shares 2 blocks with the first
        TraceRecord(3000.0, 1100, 30, (7, 5, 6)),  # shares only block 7
    ]


def test_trace_prompts_rebuild_shared_prefixes_at_any_scale() -> None:
    for scale, block in ((1.0, 512), (1 / 16, 32), (0.01, 5)):
        reqs = trace_requests(records(), VOCAB, TraceScaling(input_scale=scale, output_scale=0.5), seed=1)
        a, b, c = (r.prompt for r in reqs)
        assert [r.prompt_len for r in reqs] == [round(n * scale) for n in (1200, 1024, 1100)]
        assert all(len(r.prompt) == r.prompt_len for r in reqs)
        assert [r.output_len for r in reqs] == [5, 10, 15]
        assert a[: 2 * block] == b[: 2 * block]  # blocks 7, 8
        assert a[:block] == c[:block] and a[block : 2 * block] != c[block : 2 * block]
        assert a[2 * block :] != c[2 * block : len(a)]


def test_trace_replay_scales_time_from_the_first_arrival() -> None:
    reqs = trace_requests(records(), VOCAB, TraceScaling(), seed=1)
    assert [r.arrival_s for r in reqs] == [1.0, 1.5, 3.0]
    assert [r.arrival_s for r in time_scaled(reqs, speedup=2.0)] == [0.0, 0.25, 1.0]


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="the shared Mooncake trace is not beside the repository")
def test_the_mooncake_trace_keeps_its_sharing_when_scaled() -> None:
    recs = load_trace(SHARED_TRACE, limit=300)
    reqs = trace_requests(recs, VOCAB, TraceScaling(input_scale=1 / 16), seed=0)
    block = 32
    by_first: dict[int, list[int]] = {}
    for i, rec in enumerate(recs):
        by_first.setdefault(rec.hash_ids[0], []).append(i)
    groups = [g for g in by_first.values() if len(g) > 1]
    assert groups, "the trace's first 300 requests share prefixes"
    for group in groups:
        i, j = group[0], group[1]
        common = next((k for k, (x, y) in enumerate(zip(recs[i].hash_ids, recs[j].hash_ids, strict=False)) if x != y),
                      min(len(recs[i].hash_ids), len(recs[j].hash_ids)))  # fmt: skip
        shared = min(common * block, reqs[i].prompt_len, reqs[j].prompt_len)
        assert reqs[i].prompt[:shared] == reqs[j].prompt[:shared]


def test_a_malformed_trace_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}) + "\n{}\n")
    with pytest.raises(ValueError, match="line 2"):
        load_trace(path)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "serve", *argv])


def test_the_command_line_builds_the_sweep() -> None:
    plan = plan_from_args(parse("--concurrency", "1,8,32", "--requests", "64", "--input-len", "256"))
    assert [(p.mode, p.value) for p in plan.points] == [(LoadMode.CONCURRENCY, v) for v in (1, 8, 32)]
    assert (plan.num_requests, plan.input_len, plan.options.ignore_eos) == (64, LengthRange(256, 256), True)
    assert [plan.max_in_flight(p) for p in plan.points] == [1, 8, 32]
    assert len({plan.point_seed(i) for i in range(3)}) == 3  # fresh prompts at each point
    assert json.dumps(plan.to_json())
    rate = plan_from_args(parse("--rate", "2,inf", "--max-concurrency", "4", "--slo-ttft-ms", "500"))
    assert [p.value for p in rate.points] == [2.0, math.inf] and rate.max_in_flight(rate.points[1]) == 4
    assert rate.num_requests == 64 and rate.slo.ttft_ms == 500 and rate.options.slo_ttft_ms is None


def test_an_openai_server_is_named_by_its_url_and_its_key_stays_out_of_the_json() -> None:
    plan = plan_from_args(parse("--base-url", "http://127.0.0.1:8000/v1", "--api-key", "sk-secret"))
    assert (plan.api, plan.target) == (Api.OPENAI, "http://127.0.0.1:8000/v1")
    assert "sk-secret" not in json.dumps(plan.to_json()) and "sk-secret" not in repr(plan)
    assert plan_from_args(parse()).api is Api.GRPC


def test_a_trace_replays_every_record_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}) + "\n")
    plan = plan_from_args(parse("--trace", str(path), "--trace-speedup", "1,4"))
    assert plan.num_requests is None and [p.value for p in plan.points] == [1.0, 4.0]
    assert plan_from_args(parse("--trace", str(path), "--requests", "10")).num_requests == 10


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("--concurrency", "4", "--rate", "1"), "--concurrency"),
        (("--concurrency", "0"), "--concurrency"),
        (("--concurrency", "1.5"), "--concurrency"),
        (("--rate", "fast"), "--rate"),
        (("--requests", "0"), "--requests"),
        (("--trace", "/nonexistent.jsonl"), "--trace"),
        (("--output-len", "0"), "--output-len"),
        (("--mix", "8192/32", "--input-len", "128"), "--mix"),
        (("--mix", "8192"), "--mix"),
        (("--mix", "8192/0"), "--mix"),
        (("--mix", "8192/32@-1"), "--mix"),
        (("--mix", "8192/32@x"), "--mix"),
        (("--mix", ","), "--mix"),
        (("--api", "openai"), "--base-url"),
        (("--base-url", "localhost:8000"), "--base-url"),
        (("--api", "grpc", "--base-url", "http://127.0.0.1:8000/v1"), "--base-url"),
    ],
)
def test_bad_flags_are_refused_by_name(argv: tuple[str, ...], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        plan_from_args(parse(*argv))
