"""The receiver's grant rule without a GPU: a granted ticket that fails keeps its blocks until its
writer says Stopped, or until a grace after the writer's connection is gone (cut off when it stays
silent). The receiver runs on its own loop thread as in a transport; the connection is a recorder
standing in for a UCX endpoint whose handshake offered direct writes, which needs two GPU
processes (those run in test_direct_gpu.py), with a real side channel (a Unix socket) where a
test gives it one: the AskWrite and Granted, with the block ids inline, then cross the socket."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from engine.kv_layout import KVLayout
from kvtransfer.block_ids import decode_ids
from kvtransfer.caches import KVCaches
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Tasks
from kvtransfer.receiver import KVReceiver
from kvtransfer.side import MAX_INLINE_IDS, SideChannel, SideListener, dial_side
from kvtransfer.telemetry import NullObserver
from kvtransfer.timeline import Timeline
from kvtransfer.wire import AskWrite, Failed, Granted, Message, Stopped, Written

LAYOUT = KVLayout("m", "float32", block_size=4, num_layers=2, num_kv_heads=1, head_dim=2)
LONG = KVLayout("m", "float32", block_size=16, num_layers=2, num_kv_heads=1, head_dim=2)  # 16k tokens: 1,024 blocks
LONG_POOL = 4096
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

    def send_now(self, message: Message) -> bool:  # no side channel: the caller sends a frame instead
        return False

    async def send_payload(self, data: torch.Tensor, tag: int) -> None:
        self.payloads.append((tag, data.tolist()))

    def abort(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            self._on_lost(self, reason)


@pytest.fixture
def receiver() -> Iterator[KVReceiver]:
    yield from _running(KVCaches(LAYOUT, [torch.zeros(2, 8, 4, 1, 2) for _ in range(LAYOUT.num_layers)]))


@pytest.fixture
def long_receiver() -> Iterator[KVReceiver]:
    yield from _running(KVCaches(LONG, [torch.zeros(2, LONG_POOL, 16, 1, 2) for _ in range(LONG.num_layers)]))


def _running(caches: KVCaches) -> Iterator[KVReceiver]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
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


# ---- over a real side channel (a Unix socket, kvtransfer/side.py)


class SideConnected(RecordingConnection):
    """A recorder whose side channel is real: the receiver's end of a socket that a dialer reached
    with this connection's token, bound as a transport binds it (Connection.attach_side)."""

    def __init__(self, receiver: KVReceiver) -> None:
        super().__init__(lambda c, reason: receiver.loop.call_soon(receiver.on_lost, c, reason))
        self.side: SideChannel | None = None
        self._receiver = receiver

    def attach_side(self, channel: SideChannel) -> None:
        self.side = channel
        channel.bind(lambda message: self._receiver.on_message(self, message), self.abort)

    def send_now(self, message: Message) -> bool:  # as Connection.send_now, less its full-buffer fallback
        if self.side is None or not self.side.open:
            return False
        self.side.send(message)
        return True


@pytest.fixture
def listener(long_receiver: KVReceiver) -> Iterator[SideListener]:
    async def start() -> SideListener:
        made = SideListener(long_receiver.loop)
        assert await made.start()
        return made

    made = asyncio.run_coroutine_threadsafe(start(), long_receiver.loop).result(5)
    yield made
    long_receiver.loop.call_soon_threadsafe(made.close)


def side_connected(receiver: KVReceiver, listener: SideListener) -> tuple[SideConnected, SideChannel, list[Message]]:
    """A writer's connection with its side channel: (the receiver's record of it, the writer's end
    of the socket, what the writer heard on it)."""
    conn, heard = SideConnected(receiver), []

    async def dial() -> SideChannel:
        token = listener.offer()
        listener.expect(token, conn.attach_side)
        channel = await dial_side(listener.name, token, 5.0)
        assert channel is not None
        channel.bind(heard.append, lambda reason: None)
        return channel

    channel = asyncio.run_coroutine_threadsafe(dial(), receiver.loop).result(5)
    eventually(lambda: conn.side is not None)
    return conn, channel, heard


def test_a_grant_over_the_side_channel_carries_the_tickets_block_ids_and_nothing_takes_ucx(
    long_receiver: KVReceiver, listener: SideListener
) -> None:
    ids = random.Random(7).sample(range(LONG_POOL), 1024)  # 16k tokens
    ticket = long_receiver.expect("t", ids, num_tokens=16384, timeout_s=30)
    conn, writer, heard = side_connected(long_receiver, listener)

    writer.send(AskWrite("t"))
    eventually(lambda: bool(heard))

    grant = heard[0]
    assert isinstance(grant, Granted) and (grant.direct, grant.tag) == (True, 0)
    assert decode_ids(grant.block_ids, 1024).tolist() == ids
    assert ticket.sender == conn.peer and conn.sent == [] and conn.payloads == []

    nbytes = 1024 * LONG.num_layers * LONG.block_elems_per_layer * 4
    writer.send(Written("t", bytes=nbytes))
    assert ticket.wait(5).bytes == nbytes
    eventually(lambda: any(m.kind == "done" for m in heard))
    assert conn.sent == []  # the Done came back over the side channel too


def test_an_ask_over_the_side_channel_of_another_connection_is_refused(
    long_receiver: KVReceiver, listener: SideListener
) -> None:
    ticket = long_receiver.expect("t", [5, 2, 7], num_tokens=40, timeout_s=30)
    granted_conn, granted_writer, granted_heard = side_connected(long_receiver, listener)
    other, other_writer, other_heard = side_connected(long_receiver, listener)
    granted_writer.send(AskWrite("t"))
    eventually(lambda: bool(granted_heard))

    other_writer.send(AskWrite("t"))
    eventually(lambda: bool(other.sent))
    assert other.sent == [Failed("t", "the ticket is bound to another peer")] and other_heard == []

    other_writer.send(Written("t", bytes=3 * LONG.num_layers * LONG.block_elems_per_layer * 4))  # refused
    eventually(lambda: any(isinstance(m, Failed) for m in granted_conn.sent))  # the granted writer is told
    assert ticket.error() is None  # published only once the writer that was granted has stopped
    deliver(long_receiver, granted_conn, Stopped("t"))
    eventually(lambda: ticket.error() is not None)
    assert "not granted to this sender" in ticket.error().reason  # type: ignore[union-attr]


def test_a_ticket_with_more_ids_than_a_side_channel_message_holds_takes_its_grant_over_ucx(
    long_receiver: KVReceiver, listener: SideListener
) -> None:
    ids = list(range(MAX_INLINE_IDS + 1))
    long_receiver.expect("t", ids, num_tokens=16 * len(ids), timeout_s=30)
    conn, writer, heard = side_connected(long_receiver, listener)

    writer.send(AskWrite("t"))
    eventually(lambda: bool(conn.payloads))

    grant = conn.sent[0]
    assert grant == Granted("t", direct=True, tag=grant.tag) and grant.tag > 0  # type: ignore[union-attr]
    assert conn.payloads == [(grant.tag, ids)] and heard == []  # type: ignore[union-attr]
