"""Direct writes without a GPU: the wire messages, who may write directly, and the sender's side of
the grant rule (nothing is launched before the grant, after a stop, or past the lease as the
sender sees it; a grant that comes too late sends every layer over UCX). The writes themselves
are in test_direct_gpu.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from engine.kv_layout import KVLayout
from kvtransfer.config import TransportConfig
from kvtransfer.direct import DirectState, DirectWrite, Group
from kvtransfer.direct_send import WrittenThread
from kvtransfer.ipc import PeerCaches, host_identity
from kvtransfer.wire import AskWrite, Granted, Hello, Stopped, Welcome, Written, decode, encode

LAYOUT = KVLayout("m", "bfloat16", block_size=16, num_layers=4, num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize(
    "message",
    [
        AskWrite("t1"),
        Granted("t1", direct=True, tag=7),
        Granted("t1", direct=False),
        Written("t1", bytes=4096, checksums=((3, 2**63 + 5),)),
        Stopped("t1"),
        Hello("127.0.0.1:1", "abc", LAYOUT, host="boot/pid:[1]"),
        Welcome("127.0.0.1:2", "def", LAYOUT, export_bytes=1234),
        Welcome("127.0.0.1:2", "def", LAYOUT, 1234, side_channel="\0pdmesh-kv-x", side_token="ab" * 16),
    ],
)
def test_direct_write_messages_survive_their_frames(message: Any) -> None:
    assert decode(encode(message)) == message


def test_a_hello_from_an_older_peer_offers_no_direct_writes() -> None:
    frame = encode(Hello("127.0.0.1:1", "abc", LAYOUT))
    assert decode(frame) == Hello("127.0.0.1:1", "abc", LAYOUT, host="")


def test_a_welcome_from_an_older_peer_offers_no_side_channel() -> None:
    """A peer that predates side channels sends its Welcome without them: Written and Done take UCX."""
    welcome = decode(encode(Welcome("127.0.0.1:2", "d", LAYOUT, 10)))
    assert (welcome.side_channel, welcome.side_token) == ("", "")  # type: ignore[union-attr]


def test_the_host_identity_is_the_boot_and_the_pid_namespace() -> None:
    identity = host_identity()
    assert identity == host_identity() and "/pid:[" in identity


def test_direct_writes_need_a_gpu_and_can_be_switched_off() -> None:
    assert TransportConfig(device="cuda:0").direct_writes_on
    assert not TransportConfig(device="cuda:0", direct_writes=False).direct_writes_on
    assert not TransportConfig(device="cpu").direct_writes_on


class _Recorded:
    """Stands in for the copy stream and the launches: the state machine is what is under test."""

    def __init__(self) -> None:
        self.launched: list[int] = []


def _direct(lease_s: float = 60.0) -> tuple[DirectWrite, _Recorded]:
    recorded = _Recorded()
    direct = DirectWrite(PeerCaches([]), stream=None, num_layers=4, checksum_samples=0, lease_s=lease_s)  # type: ignore[arg-type]
    direct._launch = lambda group: recorded.launched.append(group.first_layer)  # type: ignore[method-assign]
    return direct, recorded


def _group(first: int) -> Group:
    return Group(first, [torch.zeros(1)], ready=None)  # type: ignore[arg-type]


IDS = torch.zeros(1, dtype=torch.int64)


def test_without_a_grant_by_the_last_layer_every_group_goes_over_ucx() -> None:
    direct, recorded = _direct()
    assert direct.offer(_group(0), IDS, last=False, ticket_key="t") == []
    fallback = direct.offer(_group(2), IDS, last=True, ticket_key="t")
    assert [g.first_layer for g in fallback] == [0, 2]  # type: ignore[union-attr]
    assert direct.state is DirectState.PACKED and recorded.launched == []
    direct._check_lease()
    assert direct.state is DirectState.PACKED  # a late grant arms nothing: arm() sees PACKED


def test_a_declined_grant_sends_the_kept_groups_and_the_rest_over_ucx_as_they_come() -> None:
    direct, recorded = _direct()
    direct.offer(_group(0), IDS, last=False, ticket_key="t")
    direct.decline()
    assert [g.first_layer for g in direct.offer(_group(1), IDS, last=False, ticket_key="t")] == [0, 1]  # type: ignore[union-attr]
    assert [g.first_layer for g in direct.offer(_group(2), IDS, last=False, ticket_key="t")] == [2]  # type: ignore[union-attr]
    assert recorded.launched == []


def test_after_a_stop_nothing_is_launched_or_sent() -> None:
    direct, recorded = _direct()
    direct.offer(_group(0), IDS, last=False, ticket_key="t")
    assert direct.stop() is None  # nothing was launched, so there is nothing to wait for
    direct._check_lease()
    assert direct.offer(_group(1), IDS, last=False, ticket_key="t") == []
    assert direct.offer(_group(2), IDS, last=True, ticket_key="t") == []  # not even the kept group goes over UCX
    assert recorded.launched == [] and direct.state is DirectState.STOPPED


def test_past_the_lease_as_the_sender_sees_it_nothing_is_launched() -> None:
    direct, recorded = _direct(lease_s=0.05)
    direct.state = DirectState.ARMED
    time.sleep(0.1)
    assert direct.offer(_group(0), IDS, last=False, ticket_key="t") == []
    assert recorded.launched == [] and direct.state is DirectState.STOPPED


def test_a_renewed_lease_keeps_launching() -> None:
    direct, recorded = _direct(lease_s=0.05)
    direct.state = DirectState.ARMED
    direct.renewed(time.monotonic() + 60)
    time.sleep(0.1)
    direct.offer(_group(0), IDS, last=False, ticket_key="t")
    assert recorded.launched == [0]


def test_the_written_thread_runs_every_call_it_took_and_refuses_the_rest_once_shutting_down() -> None:
    # A Written handed over is sent, or refused so that its push fails at once (sender.submit_written):
    # never taken and dropped, which would leave the receiver waiting out its lease.
    written = WrittenThread()
    busy, ran = threading.Event(), []
    written.submit(busy.wait, 10)  # the thread is waiting for a ticket's copies
    for i in range(3):
        written.submit(ran.append, i)
    stopping = threading.Thread(target=written.shutdown)
    stopping.start()
    while not written._closed:
        time.sleep(0.001)
    with pytest.raises(RuntimeError, match="shut down"):
        written.submit(ran.append, 3)
    busy.set()
    stopping.join(10)
    assert not stopping.is_alive() and ran == [0, 1, 2]
