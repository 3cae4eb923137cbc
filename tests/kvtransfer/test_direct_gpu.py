"""Two worker processes on one GPU: the sender writes a ticket's blocks straight into the receiver's
cache over CUDA IPC (direct writes), only while the receiver's grant holds, and UCX carries KV when
direct writes are off. AskWrite, Granted (with the block ids), Written and Done take the connection's
side channel (kvtransfer/side.py), or UCX frames (the ids as a payload) with it off."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from kv_peer import SMOLLM2, Peer, PeerSpec, start_peers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA_TLS = "cuda_ipc,cuda_copy,sm,tcp,self"
LAYOUT = {**SMOLLM2, "dtype": "bfloat16"}
POOL = 600
LAYER_BYTES = 2 * 16 * 3 * 64 * 2  # one block of one layer, K and V, bfloat16


def peers(
    *,
    direct_writes: bool = True,
    message_bytes: int = 8 << 20,
    checksum_samples: int = 4,
    side_channel: bool = True,
) -> tuple[Peer, Peer]:
    common = {
        "device": "cuda:0", "ucx_tls": CUDA_TLS, "direct_writes": direct_writes, "message_bytes": message_bytes,
        "checksum_samples": checksum_samples, "side_channel": side_channel,
    }  # fmt: skip
    decode, prefill = start_peers(PeerSpec(LAYOUT, POOL, **common), PeerSpec(LAYOUT, POOL, receive=False, **common))
    return decode, prefill


def eventually(check: Callable[[], bool], within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def first_ticket(decode: Peer, prefill: Peer) -> None:
    """The first push to a peer makes the connection (and maps its cache) on the way: it goes over UCX."""
    info = decode.call("expect", ticket="warm", num_tokens=64, seed=99, timeout_s=60)
    assert prefill.call("push", infos=[info], seeds=[99], layers=None, timeout_s=60)["tickets"]["warm"]["ok"]
    assert decode.call("wait", tickets=["warm"], timeout_s=60)["tickets"]["warm"]["exact"]


def granted(decode: Peer, prefill: Peer, ticket: str, num_tokens: int, seed: int, lease_s: float = 60) -> Any:
    """Expect a ticket and open its push, as a prefill worker does when the request arrives: the
    AskWrite goes at once and the grant arms the push before its first layer."""
    info = decode.call("expect", ticket=ticket, num_tokens=num_tokens, seed=seed, timeout_s=lease_s)
    prefill.call("open", infos=[info])
    eventually(lambda: prefill.call("direct_state", ticket=ticket) == "armed")
    return info


@pytest.mark.parametrize(
    ("checksum_samples", "side_channel"),
    [(4, True), (0, True), (0, False)],
    ids=["checksums", "no-checksums", "no-checksums-over-ucx-frames"],
)
def test_a_direct_write_lands_byte_exact_in_exactly_the_tickets_blocks(
    checksum_samples: int, side_channel: bool
) -> None:
    decode, prefill = peers(checksum_samples=checksum_samples, side_channel=side_channel)
    try:
        first_ticket(decode, prefill)
        assert prefill.call("connections")["side_channels"] == int(side_channel)
        tickets = {f"d{i}": 1000 - 77 * i for i in range(4)}
        infos = [granted(decode, prefill, t, n, seed=i) for i, (t, n) in enumerate(tickets.items())]

        sent = prefill.call("push", infos=infos, seeds=list(range(4)), layers=None, timeout_s=60)
        landed = decode.call("wait", tickets=list(tickets), timeout_s=60)

        assert {t: (r["ok"], r.get("direct")) for t, r in sent["tickets"].items()} == {t: (True, True) for t in tickets}
        assert {t: (r["ok"], r["exact"]) for t, r in landed["tickets"].items()} == {t: (True, True) for t in tickets}
        assert landed["tickets"]["d0"]["bytes"] == 63 * SMOLLM2["num_layers"] * LAYER_BYTES
        assert landed["stray_writes"] == 0  # nothing outside the tickets' blocks was touched
        assert landed["free_blocks"] == POOL
    finally:
        decode.stop()
        prefill.stop()


def test_a_ticket_released_mid_write_is_never_written_after_its_blocks_are_freed() -> None:
    decode, prefill = peers(message_bytes=1)  # one layer per copy: some land before the release
    try:
        first_ticket(decode, prefill)
        info = granted(decode, prefill, "rel", num_tokens=500, seed=5)
        prefill.call("push", infos=[info], seeds=[5], layers=4, timeout_s=30)  # 4 layers written, the prefill goes on

        # Decode.Release: once cancel returns, the writer has said it stopped (no copy of the ticket
        # queued or to come), so the blocks may be freed and zeroed.
        decode.call("cancel", ticket="rel", reason="released")
        landed = decode.call("wait", tickets=["rel"], timeout_s=30)
        assert not landed["tickets"]["rel"]["ok"]

        sent = prefill.call("push", infos=[info], seeds=[5], layers=None, timeout_s=30)  # the prefill's later layers
        assert not sent["tickets"]["rel"]["ok"]
        time.sleep(0.5)
        assert decode.call("wait", tickets=[], timeout_s=5)["stray_writes"] == 0  # nothing landed after the release
    finally:
        decode.stop()
        prefill.stop()


def test_a_frozen_writer_whose_lease_ran_out_writes_nothing_when_it_wakes() -> None:
    decode, prefill = peers(message_bytes=1)
    try:
        first_ticket(decode, prefill)
        info = granted(decode, prefill, "frozen", num_tokens=500, seed=6, lease_s=1.0)
        prefill.call("push", infos=[info], seeds=[6], layers=4, timeout_s=30)
        os.kill(prefill.process.pid, signal.SIGSTOP)  # no more Holds: the lease runs out
        try:
            # No Stopped can come: the receiver cuts the writer off a grace after the lease, and
            # frees the blocks a grace after that.
            eventually(lambda: "frozen" in decode.call("observations")["expired"], within_s=30)
            landed = decode.call("wait", tickets=["frozen"], timeout_s=30)
            assert not landed["tickets"]["frozen"]["ok"]
        finally:
            os.kill(prefill.process.pid, signal.SIGCONT)

        # It wakes and pushes the rest at once, before its loop has even seen the connection's loss:
        # past its own view of the lease, it launches nothing.
        sent = prefill.call("push", infos=[info], seeds=[6], layers=None, timeout_s=30)
        assert not sent["tickets"]["frozen"]["ok"]
        time.sleep(0.5)
        assert decode.call("wait", tickets=[], timeout_s=5)["stray_writes"] == 0
    finally:
        decode.stop()
        prefill.stop()


def test_with_direct_writes_off_kv_goes_over_ucx_and_lands_exact() -> None:
    decode, prefill = peers(direct_writes=False)
    try:
        first_ticket(decode, prefill)
        info = decode.call("expect", ticket="u1", num_tokens=700, seed=3, timeout_s=60)
        prefill.call("open", infos=[info])
        assert prefill.call("direct_state", ticket="u1") is None

        sent = prefill.call("push", infos=[info], seeds=[3], layers=None, timeout_s=60)
        landed = decode.call("wait", tickets=["u1"], timeout_s=60)

        assert (sent["tickets"]["u1"]["ok"], sent["tickets"]["u1"].get("direct")) == (True, None)
        assert (landed["tickets"]["u1"]["ok"], landed["tickets"]["u1"]["exact"]) == (True, True)
        assert landed["stray_writes"] == 0
    finally:
        decode.stop()
        prefill.stop()


@pytest.mark.parametrize("writers", [1, 2])
def test_writers_that_stop_first_leave_the_receiver_no_cuda_ipc_share_to_warn_of(
    writers: int, capfd: pytest.CaptureFixture[str]
) -> None:
    # torch counts each share of the receiver's caches until the one process that maps it lets go,
    # and prints "Producer process has been terminated before all shared CUDA tensors released" at
    # the receiver's exit for any share it still counts (every process here writes to this fd).
    # Each writer gets an export of its own (kvtransfer/ipc.py, CacheExport): one export for every
    # dialer, or shares tied to the caches' own storages, left counts at exit.
    common = {"device": "cuda:0", "ucx_tls": CUDA_TLS}
    decode, *writing = start_peers(
        PeerSpec(LAYOUT, POOL, **common), *[PeerSpec(LAYOUT, POOL, receive=False, **common)] * writers
    )
    try:
        for i, prefill in enumerate(writing):
            warm = decode.call("expect", ticket=f"warm{i}", num_tokens=64, seed=90 + i, timeout_s=60)
            pushed = prefill.call("push", infos=[warm], seeds=[90 + i], layers=None, timeout_s=60)
            assert pushed["tickets"][f"warm{i}"]["ok"]  # the connection, and the mapping, are made on the way
            info = granted(decode, prefill, f"d{i}", 500, seed=i)
            sent = prefill.call("push", infos=[info], seeds=[i], layers=None, timeout_s=60)
            assert sent["tickets"][f"d{i}"]["ok"] and sent["tickets"][f"d{i}"]["direct"]
        landed = decode.call("wait", tickets=[f"d{i}" for i in range(writers)], timeout_s=60)
        assert all(r["exact"] for r in landed["tickets"].values())
    finally:
        for prefill in writing:
            prefill.stop()
        decode.stop()
    assert decode.process.exitcode == 0 and all(p.process.exitcode == 0 for p in writing)
    assert "Producer process has been terminated" not in capfd.readouterr().err
