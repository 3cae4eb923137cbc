"""The receiver's grant rule without a GPU: a granted ticket that fails keeps its blocks until its
writer says Stopped, or until a grace after the writer's connection is gone (cut off when it stays
silent). The receiver runs on its own loop thread as in a transport; the connection is a recorder
standing in for a UCX endpoint whose handshake offered direct writes, which needs two GPU
processes (those run in test_direct_gpu.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from engine.kv_layout import KVLayout
from kvtransfer.caches import KVCaches
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Tasks
from kvtransfer.receiver import KVReceiver
from kvtransfer.telemetry import NullObserver
from kvtransfer.timeline import Timeline
from kvtransfer.wire import AskWrite, Failed, Granted, Message, Stopped, Written

LAYOUT = KVLayout("m", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=2)
GRACE_S = 1.0  # long enough that a loaded machine still tells "before the grace" from "after"


class RecordingConnection:
    """What the receiver sends to one sender, recorded; abort() reports the loss as a transport would."""

    def __init__(self, on_lost: Callable[[Any, str], None]) -> None:
        self.peer = "127.0.0.1:9"
        self.lost: str | None = None
        self.export_offered = True
        self.sent: list[Message] = []
        self.payloads: list[tuple[int, list[int]]] = []
        self._on_lost = on_lost
        self._tag = 2

    def next_tag(self) -> int:
        self._tag += 1
        return self._tag

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def send_now(self, message: Message) -> bool:  # Done: over a side channel, recorded alike
        self.sent.append(message)
        return True

    async def send_payload(self, data: torch.Tensor, tag: int) -> None:
        self.payloads.append((tag, data.tolist()))

    def abort(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            self._on_lost(self, reason)


@pytest.fixture
def receiver() -> Iterator[KVReceiver]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    caches = KVCaches(LAYOUT, [torch.zeros(2, 8, 4, 1, 2) for _ in range(LAYOUT.num_layers)])
    config = TransportConfig(sender_grace_s=GRACE_S)
    made = asyncio.run_coroutine_threadsafe(_make(caches, config, loop), loop).result(5)
    yield made
    loop.call_soon_threadsafe(made.shutdown)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


async def _make(caches: KVCaches, config: TransportConfig, loop: asyncio.AbstractEventLoop) -> KVReceiver:
    return KVReceiver(caches, config, NullObserver(), loop, Tasks(), "127.0.0.1:1", Timeline(False))


def deliver(receiver: KVReceiver, conn: RecordingConnection, message: Message) -> None:
    asyncio.run_coroutine_threadsafe(_deliver(receiver, conn, message), receiver.loop).result(5)


async def _deliver(receiver: KVReceiver, conn: Any, message: Message) -> None:
    receiver.on_message(conn, message)
    for _ in range(5):  # let the tasks it spawned (the grant's sends) run
        await asyncio.sleep(0)


def eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def granted_ticket(receiver: KVReceiver, lease_s: float, expired: list[str]) -> tuple[Any, RecordingConnection]:
    conn = RecordingConnection(lambda c, reason: receiver.loop.call_soon(receiver.on_lost, c, reason))
    ticket = receiver.expect("t", [5, 2, 7], num_tokens=10, timeout_s=lease_s, on_expire=lambda t: expired.append("t"))
    deliver(receiver, conn, AskWrite("t"))
    return ticket, conn


def test_the_grant_names_exactly_the_tickets_blocks_and_binds_it_to_the_writer(receiver: KVReceiver) -> None:
    ticket, conn = granted_ticket(receiver, lease_s=30, expired=[])
    grant = conn.sent[0]
    assert grant == Granted("t", direct=True, tag=grant.tag) and conn.payloads == [(grant.tag, [5, 2, 7])]
    assert ticket.sender == conn.peer

    other = RecordingConnection(lambda c, r: None)
    deliver(receiver, other, AskWrite("t"))
    assert other.sent == [Failed("t", "the ticket is bound to another peer")]
    deliver(receiver, other, Written("t", bytes=3 * 2 * 2 * 32))  # refused; it fails the ticket, as a stray Data does
    assert ticket.error() is None  # published only once the writer that was granted has stopped
    deliver(receiver, conn, Stopped("t"))
    eventually(lambda: ticket.error() is not None)
    assert "not granted to this sender" in ticket.error().reason  # type: ignore[union-attr]


def test_a_granted_ticket_whose_lease_ran_out_keeps_its_blocks_until_the_writer_stopped(receiver: KVReceiver) -> None:
    expired: list[str] = []
    ticket, conn = granted_ticket(receiver, lease_s=0.1, expired=expired)

    eventually(lambda: any(isinstance(m, Failed) for m in conn.sent))  # the lease ran out: the writer is told
    time.sleep(GRACE_S / 2)
    assert ticket.error() is None and expired == []  # still quarantined: the writer may be writing

    deliver(receiver, conn, Stopped("t"))
    eventually(lambda: expired == ["t"])
    assert "lease expired" in ticket.error().reason  # type: ignore[union-attr]
    assert conn.lost is None


def test_a_silent_writer_is_cut_off_and_the_blocks_freed_a_grace_after_its_loss(receiver: KVReceiver) -> None:
    expired: list[str] = []
    ticket, conn = granted_ticket(receiver, lease_s=0.1, expired=expired)
    started = time.monotonic()

    eventually(lambda: expired == ["t"], within_s=10)

    assert conn.lost is not None and "did not confirm it stopped" in conn.lost
    assert time.monotonic() - started >= 0.1 + 2 * GRACE_S - 0.05  # the lease, the wait for Stopped, the grace
    assert ticket.error() is not None


def test_cancel_returns_only_once_the_writer_stopped(receiver: KVReceiver) -> None:
    ticket, conn = granted_ticket(receiver, lease_s=30, expired=[])
    done = threading.Event()
    canceller = threading.Thread(target=lambda: (ticket.cancel("released"), done.set()))
    canceller.start()

    eventually(lambda: any(isinstance(m, Failed) for m in conn.sent))
    assert not done.wait(GRACE_S / 2)  # Decode.Release waits: the blocks are not free yet

    deliver(receiver, conn, Stopped("t"))
    assert done.wait(5)
    canceller.join(5)
    assert "cancelled: released" in ticket.error().reason  # type: ignore[union-attr]


def test_a_written_ticket_lands_at_once(receiver: KVReceiver) -> None:
    ticket, conn = granted_ticket(receiver, lease_s=30, expired=[])
    nbytes = 3 * LAYOUT.num_layers * LAYOUT.block_elems_per_layer * 4

    deliver(receiver, conn, Written("t", bytes=nbytes))

    assert ticket.done() and ticket.wait(1).bytes == nbytes
    eventually(lambda: any(m.kind == "done" for m in conn.sent))
