"""A decode worker's reservations when blocks are short: a large hand-off refused for want of
blocks gets its turn as blocks free up, instead of being overtaken by smaller ones until its
deadline; and nothing waits behind it forever (its claim ends when it stops asking, or after the
bound). A real engine (the tiny model, 32 blocks of 4 tokens, 3 kept free while busy) and a real
KV transport (UCX over tcp) behind the worker's own Reservations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine
from engine.errors import OutOfBlocks
from kvtransfer.config import TransportConfig
from kvtransfer.transport import KVTransport
from services.decode.line import Line
from services.decode.reservations import Reservations
from tests.engine.engine_helpers import make_engine

BLOCK = 4  # tokens per block


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
async def worker(tiny_llama: Path) -> AsyncIterator[tuple[Reservations, Clock]]:
    engine = make_engine(tiny_llama, num_blocks=32, block_size=BLOCK)
    async_engine = AsyncEngine(engine)
    transport = KVTransport(engine.kv_layout, TransportConfig(ucx_tls="tcp,self"), engine.kv_caches).start()
    clock = Clock()
    reservations = Reservations(async_engine, transport, "decode-0", lease_ms=600_000, line=Line(clock))
    try:
        yield reservations, clock
    finally:
        await reservations.close()
        transport.close()
        async_engine.shutdown()


async def test_a_large_hand_off_refused_twice_gets_the_blocks_that_free_up(
    worker: tuple[Reservations, Clock],
) -> None:
    reservations, clock = worker
    running = await reservations.reserve("running", 12 * BLOCK)  # 20 of 32 blocks left
    # 20 blocks for the large one would leave fewer than the 3 kept free while busy: refused,
    # and again after the scheduler found no other decode worker. The second refusal claims.
    for _ in range(2):
        with pytest.raises(OutOfBlocks):
            await reservations.reserve("large", 20 * BLOCK)
        clock.now += 0.25

    # A small one would fit (2 + 3 <= 20), but would eat into the large one's turn.
    with pytest.raises(OutOfBlocks, match="set aside for a larger request"):
        await reservations.reserve("small", 2 * BLOCK)

    assert await reservations.release(running.ticket_id)  # the running request's blocks come back
    large = await reservations.reserve("large", 20 * BLOCK)
    small = await reservations.reserve("small", 2 * BLOCK)  # the claim is gone with its grant
    assert (large.num_blocks, small.num_blocks) == (20, 2)


async def test_a_small_one_that_leaves_the_claimed_blocks_free_is_not_held_back(
    worker: tuple[Reservations, Clock],
) -> None:
    reservations, clock = worker
    running = await reservations.reserve("running", 12 * BLOCK)
    for _ in range(2):
        with pytest.raises(OutOfBlocks):
            await reservations.reserve("large", 20 * BLOCK)
        clock.now += 0.25
    assert await reservations.release(running.ticket_id)
    # Before the large one asks again: 32 free, 2 for the small one still leave its 20 (and 3 kept).
    assert (await reservations.reserve("small", 2 * BLOCK)).num_blocks == 2
    assert (await reservations.reserve("large", 20 * BLOCK)).num_blocks == 20


async def test_nothing_waits_behind_a_claim_forever(worker: tuple[Reservations, Clock]) -> None:
    reservations, clock = worker
    await reservations.reserve("running", 12 * BLOCK)
    for name in ("gone", "slow"):
        for _ in range(2):
            with pytest.raises(OutOfBlocks):
                await reservations.reserve(name, 20 * BLOCK)
            clock.now += 0.25
        if name == "gone":
            # The claimant stops asking (it found blocks on another worker, or gave up).
            clock.now += 2.0
            assert (await reservations.reserve("small-1", BLOCK)).num_blocks == 1

    # "slow" keeps asking, but past the bound its claim ends for good and smaller ones go ahead.
    for _ in range(200):
        clock.now += 0.25
        with pytest.raises(OutOfBlocks):
            await reservations.reserve("slow", 20 * BLOCK)
    assert (await reservations.reserve("small-2", BLOCK)).num_blocks == 1
