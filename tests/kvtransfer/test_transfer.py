"""Two worker processes exchange a request's KV over UCX (tcp on loopback), as prefill and decode do.

Payloads are SmolLM2-shaped (30 layers, 3 KV heads, head dim 64, float32, 16-token blocks) and
every request's blocks lie scattered over a pool of 2,100 blocks on both sides.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from kv_peer import SMOLLM2, Peer, PeerSpec, start_peers

from kvtransfer import TransferFailed

POOL = 2100
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4  # one block, every layer, K and V, float32
TWO = ("kept", "left")


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Peer, Peer]]:
    """(decode, prefill): a receiving and a sending worker with SmolLM2's KV layout."""
    decode, prefill = start_peers(PeerSpec(SMOLLM2, POOL), PeerSpec(SMOLLM2, POOL, receive=False))
    yield decode, prefill
    decode.stop()
    prefill.stop()


def transfer(decode: Peer, prefill: Peer, tickets: dict[str, int], seed: int = 0) -> tuple[dict, dict]:
    seeds = [seed + i for i in range(len(tickets))]
    infos = [
        decode.call("expect", ticket=t, num_tokens=n, seed=s, timeout_s=60)
        for (t, n), s in zip(tickets.items(), seeds, strict=True)
    ]
    sent = prefill.call("push", infos=infos, seeds=seeds, layers=None, timeout_s=60)
    landed = decode.call("wait", tickets=list(tickets), timeout_s=60)
    return sent, landed


def test_a_1000_token_request_lands_byte_exact_in_the_reserved_blocks(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair

    sent, landed = transfer(decode, prefill, {"req-1": 1000})

    assert sent["tickets"]["req-1"] == {"ok": True, "bytes": 63 * BLOCK_BYTES}
    assert landed["tickets"]["req-1"] == {"ok": True, "bytes": 63 * BLOCK_BYTES, "exact": True}
    assert landed["free_blocks"] == POOL  # the stand-in engine freed them after checking
    assert landed["stray_writes"] == 0  # nothing outside the ticket's blocks was written
    completed = decode.call("observations")["completed"]
    assert [(s.ticket, s.peer, s.bytes) for s in completed] == [("req-1", prefill.address, 63 * BLOCK_BYTES)]
    assert completed[0].gbps > 0


def test_a_second_request_reuses_the_staging_buffers(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair
    first, _ = transfer(decode, prefill, {"warm-1": 1000}, seed=10)

    second, landed = transfer(decode, prefill, {"warm-2": 1000}, seed=11)

    assert landed["tickets"]["warm-2"]["exact"]
    # How many messages are in flight at once depends on how fast the transport thread sends
    # (on a loaded machine the second request may have one more out than the first): the pool
    # allocates only past the most buffers of a size ever in use at once, never per request.
    assert second["staging_allocations"] == second["staging_peak"]


def test_32_concurrent_tickets_all_land_exact(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair
    tickets = {f"conc-{i}": 1000 - 7 * i for i in range(32)}  # 777..1000 tokens, partly filled last blocks

    sent, landed = transfer(decode, prefill, tickets, seed=100)

    assert all(r["ok"] for r in sent["tickets"].values())
    assert {t: (r["ok"], r["exact"]) for t, r in landed["tickets"].items()} == {t: (True, True) for t in tickets}
    assert landed["free_blocks"] == POOL
    assert landed["stray_writes"] == 0


@pytest.mark.slow
def test_a_1_gib_request(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair
    tokens = (1 << 30) // BLOCK_BYTES * 16  # 23,296 tokens: 1,456 blocks, 1.0 GiB

    sent, landed = transfer(decode, prefill, {"big": tokens}, seed=1000)

    assert sent["tickets"]["big"] == {"ok": True, "bytes": 1456 * BLOCK_BYTES}
    assert landed["tickets"]["big"]["exact"]
    assert landed["free_blocks"] == POOL


def test_a_payload_larger_than_the_reservation_is_refused(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair
    info = decode.call("expect", ticket="small", num_tokens=500, seed=0, timeout_s=60)  # 32 blocks
    forged = replace(info, num_blocks=63, num_tokens=1000)  # the sender believes it may send 63

    sent = prefill.call("push", infos=[forged], seeds=[0], layers=None, timeout_s=60)
    landed = decode.call("wait", tickets=["small"], timeout_s=60)

    error = landed["tickets"]["small"]["error"]
    assert isinstance(error, TransferFailed)
    assert error.reason == "the sender has 63 blocks, the reservation 32"
    assert error.bytes_moved == 0
    assert sent["tickets"]["small"]["error"].reason == (
        "the receiver ended it: the sender has 63 blocks, the reservation 32"
    )
    assert landed["free_blocks"] == POOL
    assert landed["stray_writes"] == 0


def test_a_sender_cancel_fails_the_ticket_on_both_sides(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair
    info = decode.call("expect", ticket="abandoned", num_tokens=1000, seed=0, timeout_s=60)
    prefill.call("push", infos=[info], seeds=[0], layers=10, timeout_s=60)

    prefill.call("cancel", ticket="abandoned", reason="client went away")

    landed = decode.call("wait", tickets=["abandoned"], timeout_s=10)
    assert landed["tickets"]["abandoned"]["error"].reason == "the sender ended it: cancelled: client went away"
    assert landed["free_blocks"] == POOL
    sent = prefill.call("wait_push", tickets=["abandoned"], timeout_s=10)
    assert sent["tickets"]["abandoned"]["error"].reason == "cancelled: client went away"


def test_a_receiver_cancel_reaches_the_sender(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair
    info = decode.call("expect", ticket="dropped", num_tokens=1000, seed=0, timeout_s=60)
    prefill.call("push", infos=[info], seeds=[0], layers=10, timeout_s=60)

    decode.call("cancel", ticket="dropped", reason="scheduler aborted")

    sent = prefill.call("wait_push", tickets=["dropped"], timeout_s=10)
    assert sent["tickets"]["dropped"]["error"].reason == "the receiver ended it: cancelled: scheduler aborted"
    landed = decode.call("wait", tickets=["dropped"], timeout_s=10)
    assert landed["tickets"]["dropped"]["error"].reason == "cancelled: scheduler aborted"
    assert landed["stray_writes"] == 0


def test_a_stalled_sender_fails_the_ticket_at_its_lease(pair: tuple[Peer, Peer]) -> None:
    decode, prefill = pair
    info = decode.call("expect", ticket="stalled", num_tokens=1000, seed=0, timeout_s=1.5)
    prefill.call("push", infos=[info], seeds=[0], layers=10, timeout_s=60)  # two messages, then nothing more

    landed = decode.call("wait", tickets=["stalled"], timeout_s=10)

    result = landed["tickets"]["stalled"]
    assert result["error"].reason.startswith("the lease expired with 10 of 30 layers landed")
    assert result["after_s"] < 3.0
    assert landed["free_blocks"] == POOL
    sent = prefill.call("wait_push", tickets=["stalled"], timeout_s=10)
    assert not sent["tickets"]["stalled"]["ok"]


def test_the_lease_is_one_clock_a_landed_ticket_left_uncommitted_expires_a_committed_one_does_not(
    pair: tuple[Peer, Peer],
) -> None:
    decode, prefill = pair
    infos = [decode.call("expect", ticket=t, num_tokens=64, seed=i, timeout_s=3.0) for i, t in enumerate(TWO)]
    sent = prefill.call("push", infos=infos, seeds=[0, 1], layers=None, timeout_s=60)
    assert [sent["tickets"][t]["ok"] for t in TWO] == [True, True]

    assert decode.call("commit", ticket="kept") is True
    deadline = time.monotonic() + 15
    while "left" not in decode.call("observations")["expired"]:
        assert time.monotonic() < deadline, "the uncommitted ticket's lease never ended"
        time.sleep(0.1)

    assert decode.call("commit", ticket="left") is False  # too late: its lease ended
    expired = decode.call("observations")["expired"]
    assert expired.count("left") == 1 and "kept" not in expired
    landed = decode.call("wait", tickets=["kept", "left"], timeout_s=10)
    assert [landed["tickets"][t]["ok"] for t in TWO] == [True, True]  # both had landed whole


def test_a_prefill_waiting_longer_than_the_lease_keeps_its_ticket_while_its_sender_holds_it(
    pair: tuple[Peer, Peer],
) -> None:
    decode, prefill = pair
    queued = decode.call("expect", ticket="queued", num_tokens=300, seed=3, timeout_s=1.0)
    decode.call("expect", ticket="idle", num_tokens=300, seed=4, timeout_s=1.0)
    prefill.call("open", infos=[queued])  # its prefill waits behind others; nobody opened "idle"

    time.sleep(3.5)  # three and a half leases

    assert decode.call("status", ticket="queued")["error"] is None, "a held ticket expired"
    assert "idle" in decode.call("observations")["expired"], "a ticket nobody holds kept its blocks"
    sent = prefill.call("push", infos=[queued], seeds=[3], layers=None, timeout_s=30)
    assert sent["tickets"]["queued"]["ok"]
    landed = decode.call("wait", tickets=["queued", "idle"], timeout_s=10)
    assert landed["tickets"]["queued"]["ok"] and landed["tickets"]["queued"]["exact"]
    assert landed["tickets"]["idle"]["error"].reason.startswith("the lease expired with 0 of 30 layers")
    assert landed["free_blocks"] == POOL
