"""Peers that die, restart or don't match: tickets fail fast and typed, blocks come back, the next works.

Small payloads (8 layers of 1 MiB per 512-token request, one layer per message) so that "mid-transfer"
is a state the test can hold: the sender has pushed 4 of 8 layers and they have landed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from kv_peer import Peer, PeerSpec, outside_address, start_peers

from kvtransfer import IncompatiblePeer, TransferFailed

SMALL = {
    "model_fingerprint": "tiny",
    "dtype": "float32",
    "block_size": 16,
    "num_layers": 8,
    "num_kv_heads": 4,
    "head_dim": 64,
}
POOL = 64
LAYER_BYTES = 32 * 2 * 16 * 4 * 64 * 4  # 512 tokens: 32 blocks, one layer, 1 MiB
LEASE_S = 30.0


def spec(*, receive: bool = True, port: int = 0, layout: dict | None = None) -> PeerSpec:
    return PeerSpec(layout or SMALL, POOL, receive=receive, port=port, message_bytes=LAYER_BYTES)


def eventually(check: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def half_pushed(decode: Peer, prefill: Peer, ticket: str) -> None:
    """Expect a 512-token ticket, push its first 4 layers and wait until they have landed."""
    info = decode.call("expect", ticket=ticket, num_tokens=512, seed=1, timeout_s=LEASE_S)
    prefill.call("push", infos=[info], seeds=[1], layers=4, timeout_s=LEASE_S)
    eventually(lambda: decode.call("status", ticket=ticket)["layers_ready"] == 4)


def full_transfer(decode: Peer, prefill: Peer, ticket: str) -> dict:
    info = decode.call("expect", ticket=ticket, num_tokens=512, seed=2, timeout_s=LEASE_S)
    assert prefill.call("push", infos=[info], seeds=[2], layers=None, timeout_s=LEASE_S)["tickets"][ticket]["ok"]
    return decode.call("wait", tickets=[ticket], timeout_s=LEASE_S)["tickets"][ticket]


def test_a_sender_killed_mid_transfer_fails_the_ticket_and_a_restarted_sender_succeeds() -> None:
    decode, prefill = start_peers(spec(), spec(receive=False))
    peers = [decode, prefill]
    try:
        half_pushed(decode, prefill, "t1")

        prefill.kill()

        landed = decode.call("wait", tickets=["t1"], timeout_s=LEASE_S)
        error = landed["tickets"]["t1"]["error"]
        assert isinstance(error, TransferFailed)
        assert (error.peer, error.ticket, error.bytes_moved) == (prefill.address, "t1", 4 * LAYER_BYTES)
        assert error.reason.startswith("connection lost")
        assert landed["tickets"]["t1"]["after_s"] < 15.0  # well inside the 30 s lease (loose: CI may be loaded)
        assert landed["free_blocks"] == POOL
        assert landed["stray_writes"] == 0

        (restarted,) = start_peers(spec(receive=False))
        peers.append(restarted)
        assert full_transfer(decode, restarted, "t2") == {"ok": True, "bytes": 8 * LAYER_BYTES, "exact": True}
    finally:
        for peer in peers:
            peer.stop()


def test_a_sender_killed_while_its_prefill_waits_fails_the_ticket_at_once() -> None:
    decode, prefill = start_peers(spec(), spec(receive=False))
    peers = [decode, prefill]
    try:
        info = decode.call("expect", ticket="t9", num_tokens=512, seed=9, timeout_s=LEASE_S)
        prefill.call("open", infos=[info])  # its first Hold binds the ticket to the connection
        eventually(lambda: decode.call("status", ticket="t9")["sender"] is not None, within_s=30)

        prefill.kill()

        landed = decode.call("wait", tickets=["t9"], timeout_s=LEASE_S)
        assert landed["tickets"]["t9"]["error"].reason.startswith("connection lost")
        assert landed["tickets"]["t9"]["after_s"] < 15.0  # not the 30 s lease (loose: CI may be loaded)
        assert landed["free_blocks"] == POOL
    finally:
        for peer in peers:
            peer.stop()


def test_a_receiver_killed_mid_transfer_fails_the_push_and_its_restart_on_the_same_port_is_redialed() -> None:
    decode, prefill = start_peers(spec(), spec(receive=False))
    peers = [decode, prefill]
    try:
        half_pushed(decode, prefill, "t3")

        decode.kill()

        sent = prefill.call("wait_push", tickets=["t3"], timeout_s=LEASE_S)
        error = sent["tickets"]["t3"]["error"]
        assert isinstance(error, TransferFailed)
        assert (error.peer, error.ticket, error.bytes_moved) == (decode.address, "t3", 4 * LAYER_BYTES)
        assert error.reason.startswith("connection lost")
        assert sent["tickets"]["t3"]["after_s"] < 5.0

        (restarted,) = start_peers(spec(port=int(decode.address.rsplit(":", 1)[1])))
        peers.append(restarted)
        assert restarted.address == decode.address
        assert full_transfer(restarted, prefill, "t4") == {"ok": True, "bytes": 8 * LAYER_BYTES, "exact": True}
    finally:
        for peer in peers:
            peer.stop()


def test_an_incompatible_peer_is_refused_naming_the_field() -> None:
    decode, prefill = start_peers(spec(), spec(receive=False, layout={**SMALL, "num_kv_heads": 2}))
    try:
        info = decode.call("expect", ticket="t5", num_tokens=512, seed=0, timeout_s=LEASE_S)

        sent = prefill.call("push", infos=[info], seeds=[0], layers=None, timeout_s=LEASE_S)

        error = sent["tickets"]["t5"]["error"]
        assert isinstance(error, IncompatiblePeer)
        assert (error.peer, error.ticket, error.field) == (decode.address, "t5", "num_kv_heads")
        assert str(error) == (
            f"ticket 't5' with peer {decode.address} failed after 0 bytes: "
            "incompatible peer: num_kv_heads (ours 2, theirs 4)"
        )
        decode.call("cancel", ticket="t5", reason="the prefill worker cannot serve it")
        assert decode.call("wait", tickets=["t5"], timeout_s=5)["free_blocks"] == POOL
    finally:
        decode.stop()
        prefill.stop()


def test_a_worker_advertised_on_loopback_refuses_connections_from_other_addresses() -> None:
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address besides loopback")
    # The decode peer advertises 127.0.0.1, so it accepts loopback connections only. One prefill
    # peer uses every device and dials the decode peer's port on another address of this machine.
    decode, stranger, neighbour = start_peers(
        spec(), replace(spec(receive=False), host=outside, loopback_only=False), spec(receive=False)
    )
    try:
        info = decode.call("expect", ticket="t7", num_tokens=512, seed=0, timeout_s=LEASE_S)
        elsewhere = replace(info, address=f"{outside}:{info.port}")
        sent = stranger.call("push", infos=[elsewhere], seeds=[0], layers=None, timeout_s=10)
        assert not sent["tickets"]["t7"]["ok"], "the connection from outside loopback was accepted"
        decode.call("cancel", ticket="t7", reason="test over")

        assert full_transfer(decode, neighbour, "t8")["exact"], "loopback peers are still served"
    finally:
        for peer in (decode, stranger, neighbour):
            peer.stop()
