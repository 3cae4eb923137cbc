"""Connections opened before a ticket needs them (KVTransport.preconnect, kvtransfer/warm.py): real
peer processes over UCX/tcp. The first push to a preconnected peer dials nothing; a peer that dies
loses its connection and its restart gets a new one; a peer left out is closed once no ticket uses
it; an unreachable peer fails nothing and is tried again; a transport closed while a dial hangs
still stops UCX cleanly."""

from __future__ import annotations

import socket
import time

from kv_peer import SMOLLM2, Peer, start_peers
from structlog.testing import capture_logs
from test_failures import LAYER_BYTES, LEASE_S, POOL, eventually, full_transfer, spec

from engine.kv_layout import KVLayout
from kvtransfer import KVTransport, TransportConfig


def connections(peer: Peer) -> dict:
    return peer.call("connections")


def connected(prefill: Peer, wanted: list[str], within_s: float = 30.0) -> dict:
    """Name `wanted` to the prefill peer every 0.1 s, as load reports do, until it holds exactly
    those connections; their state then."""

    def holds() -> bool:
        prefill.call("preconnect", peers=wanted)
        return connections(prefill)["peers"] == sorted(wanted)

    eventually(holds, within_s)
    return connections(prefill)


def test_a_preconnected_peer_is_connected_before_any_ticket_and_the_first_push_dials_nothing() -> None:
    first, second, prefill = start_peers(spec(), spec(), spec(receive=False))
    try:
        connected(prefill, [first.address, second.address])
        # the preconnect counts its dial once the dial's result reaches it, just after the connection
        eventually(lambda: connections(prefill)["preconnected"] == 2)
        assert connections(prefill)["dials"] == 2

        assert full_transfer(first, prefill, "t1") == {"ok": True, "bytes": 8 * LAYER_BYTES, "exact": True}
        assert full_transfer(second, prefill, "t2")["exact"]
        assert connections(prefill)["dials"] == 2  # both pushes went over the connections already open
    finally:
        for peer in (first, second, prefill):
            peer.stop()


def test_a_restarted_peer_gets_a_new_connection_and_one_left_out_is_closed_once_idle() -> None:
    decode, prefill = start_peers(spec(), spec(receive=False))
    peers = [decode, prefill]
    try:
        connected(prefill, [decode.address])
        decode.kill()
        eventually(lambda: connections(prefill)["peers"] == [], within_s=30)  # UCX saw the peer go

        (restarted,) = start_peers(spec(port=int(decode.address.rsplit(":", 1)[1])))
        peers.append(restarted)
        state = connected(prefill, [restarted.address])
        assert state["dials"] == 2
        assert full_transfer(restarted, prefill, "t1")["exact"]
        assert connections(prefill)["dials"] == 2

        # A ticket in flight keeps its connection although the peer left the list ...
        info = restarted.call("expect", ticket="t2", num_tokens=512, seed=2, timeout_s=LEASE_S)
        prefill.call("open", infos=[info])
        eventually(lambda: restarted.call("status", ticket="t2")["sender"] is not None, within_s=30)
        prefill.call("preconnect", peers=[])
        time.sleep(0.5)
        assert connections(prefill)["peers"] == [restarted.address]
        assert prefill.call("push", infos=[info], seeds=[2], layers=None, timeout_s=LEASE_S)["tickets"]["t2"]["ok"]
        assert restarted.call("wait", tickets=["t2"], timeout_s=LEASE_S)["tickets"]["t2"]["exact"]
        # ... and closes once idle.
        connected(prefill, [])
        assert restarted.call("wait", tickets=[], timeout_s=1)["free_blocks"] == POOL
    finally:
        for peer in peers:
            peer.stop()


def test_an_unreachable_peer_fails_nothing_and_is_connected_once_it_listens() -> None:
    (prefill,) = start_peers(spec(receive=False))
    (probe,) = start_peers(spec())
    address = probe.address
    probe.stop()  # its port is free now: nothing listens there
    peers = [prefill]
    try:
        prefill.call("preconnect", peers=[address])
        time.sleep(1.0)
        assert connections(prefill)["peers"] == []

        (decode,) = start_peers(spec(port=int(address.rsplit(":", 1)[1])))
        peers.append(decode)
        connected(prefill, [decode.address], within_s=60)  # after the failed try's backoff
        eventually(lambda: connections(prefill)["preconnected"] == 1)
        assert full_transfer(decode, prefill, "t1")["exact"]
        assert connections(prefill)["dials"] == 1
    finally:
        for peer in peers:
            peer.stop()


def test_a_transport_closed_while_a_dial_hangs_stops_ucx_cleanly() -> None:
    # A peer that takes the TCP connection and never answers: the dial waits in ucxx's
    # create_endpoint. A cancelled dial still referred to (its task, holding its traceback) keeps
    # the UCX context alive, and the reset at close failed with "not all Endpoints ... are closed()"
    # (seen on GPU workers stopped while re-dialing a restarted KV store).
    with socket.create_server(("127.0.0.1", 0)) as silent, capture_logs() as logs:
        silent.settimeout(30)
        transport = KVTransport(KVLayout(**SMOLLM2), TransportConfig(ucx_tls="tcp,self")).start()
        try:
            transport.preconnect([f"127.0.0.1:{silent.getsockname()[1]}"])
            accepted, _ = silent.accept()  # the dial is in flight
        finally:
            transport.close()
        accepted.close()
    assert [entry for entry in logs if entry["event"] == "ucxx reset incomplete"] == []
    assert transport.num_in_flight == 0
