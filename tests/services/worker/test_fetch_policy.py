"""A worker fetches a prefix from the KV store only when that is predicted faster than computing it.

The scenarios run on synthetic rates: a store answering lookups in 2 ms and fetching at a given ms
per MiB, an engine computing a prompt token in 0.05 ms (plus a fixed 2 ms per step), 16-token
blocks of 1 MiB each.
"""

from __future__ import annotations

import asyncio

import pytest
from pytest import approx

from engine.kv_layout import KVLayout
from engine.step_samples import StepSample, StepShape
from services.worker import offers
from services.worker.fetch_policy import FetchMode, FetchPlan, FetchPolicy, FetchReason, FetchSettings
from services.worker.offers import Offerer
from services.worker.store_client import StoreClient

MiB = 1 << 20
STORE = "127.0.0.1:1"
BLOCK = 16


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def prompt_steps(ms_per_token: float, ns_per_pair: float = 0.0, fixed_ms: float = 2.0) -> list[StepSample]:
    """Steps of one prompt each, of several lengths, timed exactly by the given rates."""
    steps = []
    for tokens in (64, 128, 256, 512, 1024, 2048):
        shape = StepShape(tokens, StepShape.attention_pairs(tokens, 0))
        ms = fixed_ms + ms_per_token * tokens + ns_per_pair * 1e-6 * shape.num_prefill_attention_pairs
        steps.append(StepSample(shape, ms))
    return steps


def policy(ms_per_mib: float | None, clock: Clock, *, mode: FetchMode = FetchMode.WHEN_FASTER) -> FetchPolicy:
    """A policy that has seen the engine compute at 0.05 ms a token and, unless None, one 64 MiB
    fetch from the store take 2 ms + 64 x ms_per_mib."""
    p = FetchPolicy(FetchSettings(mode=mode, reprobe_s=10.0, probe_bytes=8 * MiB), MiB, BLOCK, clock)
    p.compute.observe(prompt_steps(0.05))
    p.store(STORE).lookup_took(2.0)
    if ms_per_mib is not None:
        p.fetch_took(STORE, 64, 2.0 + 64 * ms_per_mib, landed=True)
    return p


def test_the_compute_cost_is_fitted_to_the_engines_steps() -> None:
    p = FetchPolicy(FetchSettings(), MiB, BLOCK)
    assert p.compute.compute_ms(1600, 0) is None  # nothing measured yet
    p.compute.observe(prompt_steps(0.05, ns_per_pair=20.0))
    pairs = StepShape.attention_pairs(1600, 8000)
    assert p.compute.compute_ms(1600, 8000) == approx(0.05 * 1600 + 20e-6 * pairs, rel=1e-6)


def test_with_nothing_measured_the_worker_fetches_to_learn() -> None:
    clock = Clock()
    # A store never measured: a probe's worth (8 MiB, 8 blocks) is fetched, the rest computed.
    assert policy(None, clock).plan(STORE, 100, 0, 5000) == FetchPlan(8, FetchReason.LEARNING, None, approx(80.0))
    # An engine that never computed, from a measured store: all the fetch's time allows.
    engine_unmeasured = FetchPolicy(FetchSettings(), MiB, BLOCK, clock)
    engine_unmeasured.fetch_took(STORE, 64, 64.0, landed=True)
    assert engine_unmeasured.plan(STORE, 100, 0, 5000) == FetchPlan(100, FetchReason.LEARNING, approx(100.0), None)
    assert engine_unmeasured.plan(STORE, 100, 0, 50.0).num_blocks == 50


def test_a_fetch_predicted_faster_is_made_whole() -> None:
    # 100 blocks: fetching 2 + 100 x 0.5 = 52 ms against computing 1,600 tokens in 80 ms.
    assert policy(0.5, Clock()).plan(STORE, 100, 0, 5000) == FetchPlan(
        100, FetchReason.FASTER, approx(52.0), approx(80.0)
    )


def test_a_fetch_predicted_slower_is_computed_instead() -> None:
    # At 1 ms per MiB (the H200's ~0.6 GB/s is 1.6): 102 ms against 80 ms.
    assert policy(1.0, Clock()).plan(STORE, 100, 0, 5000) == FetchPlan(
        0, FetchReason.SLOWER, approx(102.0), approx(80.0)
    )


def test_a_fetch_takes_only_as_much_as_lands_within_its_time() -> None:
    # 30 ms allowed: 2 ms overhead leaves room for 56 blocks (28 ms), which beat computing 896 tokens (44.8 ms).
    plan = policy(0.5, Clock()).plan(STORE, 100, 0, 30.0)
    assert (plan.num_blocks, plan.reason) == (56, FetchReason.FASTER)


def test_a_slow_store_is_probed_again_and_used_once_fast() -> None:
    clock = Clock()
    p = policy(1.0, clock)
    assert p.plan(STORE, 100, 0, 5000).reason is FetchReason.SLOWER
    clock.now += 9.9
    assert p.plan(STORE, 100, 0, 5000).reason is FetchReason.SLOWER
    clock.now += 0.1
    assert p.plan(STORE, 100, 0, 5000) == FetchPlan(
        8, FetchReason.PROBE, approx(102.0), approx(80.0)
    )  # 8 MiB: 8 blocks
    for _ in range(10):  # the probes land fast: 8 blocks in 2 + 8 x 0.1 ms
        p.fetch_took(STORE, 8, 2.8, landed=True)
    plan = p.plan(STORE, 100, 0, 5000)
    assert (plan.num_blocks, plan.reason) == (100, FetchReason.FASTER)


def test_a_failed_fetch_counts_as_at_least_as_slow_as_it_took() -> None:
    p = policy(0.5, Clock())
    p.fetch_took(STORE, 100, 5000.0, landed=False)  # timed out after 5 s
    assert p.plan(STORE, 100, 0, 5000).reason is FetchReason.SLOWER


def test_each_store_is_measured_on_its_own() -> None:
    p = policy(1.0, Clock())
    assert p.plan("127.0.0.1:2", 100, 0, 5000) == FetchPlan(8, FetchReason.LEARNING, None, approx(80.0))


def test_always_fetches_every_hit() -> None:
    assert policy(1.0, Clock(), mode=FetchMode.ALWAYS).plan(STORE, 100, 0, 5000) == FetchPlan(100, FetchReason.ALWAYS)


def test_the_offer_backlog_is_bounded_in_bytes_and_counts_what_it_drops() -> None:
    layout = KVLayout("tiny-model", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=8)
    block_bytes = layout.bytes_per_token * layout.block_size  # 256

    async def run() -> None:
        store = StoreClient(layout, 0.3, 2.0)
        store.point_at(STORE)
        offerer = Offerer(None, None, store, backlog_bytes=10 * block_bytes)  # type: ignore[arg-type]
        chain = tuple(range(6))
        offerer.enqueue([chain, chain[:3]])  # the shorter one is the longer's prefix: offered once
        offerer.enqueue([tuple(range(100, 106))])  # 4 of its 6 blocks fit; its prefix is kept
        assert offerer.backlog_blocks == 10 and store.counters.offer_dropped_blocks == 2
        offerer.enqueue([(7, 8)])
        assert offerer.backlog_blocks == 10 and store.counters.offer_dropped_blocks == 4
        await store.close()

    asyncio.run(run())


class Transport:
    """What an Offerer reads of its worker's transport: the tickets in flight now."""

    def __init__(self, num_in_flight: int) -> None:
        self.num_in_flight = num_in_flight


def test_an_offer_waits_for_the_handoffs_in_flight_then_goes_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        transport = Transport(num_in_flight=1)
        layout = KVLayout("tiny-model", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=8)
        offerer = Offerer(None, transport, StoreClient(layout, 0.3, 2.0), 1 << 20)  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(offerer._yield_to_handoffs())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # a hand-off is in flight: no offer starts
        transport.num_in_flight = 0
        await asyncio.wait_for(waiting, 1.0)  # it is done: the offer goes

        monkeypatch.setattr(offers, "_YIELD_MAX_S", 0.05)
        transport.num_in_flight = 1  # hand-offs all the time: an offer still goes after the wait
        await asyncio.wait_for(offerer._yield_to_handoffs(), 1.0)
        await offerer.store.close()

    asyncio.run(run())


def test_a_mapped_route_is_measured_apart_with_a_larger_probe() -> None:
    # Over UCX the store is slow (fetching 100 blocks: 2 + 100 x 5 = 502 ms against computing
    # them in 80 ms): computed. Its mapped route is a route of its own, never measured: probed
    # with up to 1 GiB (here all 100 blocks), so a copy's fixed costs do not pass for bandwidth.
    clock = Clock()
    p = policy(5.0, clock)
    assert p.plan(STORE, 100, 0, 5000).reason is FetchReason.SLOWER
    shared = FetchPolicy.route(STORE, shared=True)
    assert shared != STORE
    assert p.plan(shared, 100, 0, 5000) == FetchPlan(100, FetchReason.LEARNING, None, approx(80.0))
    p.store(shared).lookup_took(1.0)
    p.fetch_took(shared, 100, 1.0 + 100 * 0.1, landed=True)  # a copy at 0.1 ms per MiB
    assert p.plan(shared, 100, 0, 5000) == FetchPlan(100, FetchReason.FASTER, approx(11.0), approx(80.0))
    assert p.plan(STORE, 100, 0, 5000).reason is FetchReason.SLOWER  # UCX's measure is its own
