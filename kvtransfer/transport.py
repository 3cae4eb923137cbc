"""KVTransport: one worker's UCX listener, connections, and the thread its event loop runs on.

UCX (through ucxx's asyncio API) runs on an event loop in a thread of its own, so the engine's
step thread and a gRPC service's event loop both call in thread-safely. The transport owns the
process-wide ucxx context (one per process: ucxx keeps it global; ucx_context.py), the listener
peers dial, and one cached connection per peer it dials; a connection that is lost (the peer died
or restarted) is dropped and the next ticket to that peer dials again. Every new connection
starts with a handshake comparing KV layouts (handshake.py); a peer whose layout differs is
refused, naming the field. preconnect() names the peers this worker may push to: their connections
are opened in the background before a ticket needs them, and closed once a peer leaves (warm.py).

A worker's transport has one layout, its engine's. A KV store's (layout None) holds
blocks of every layout its clients bring: it accepts each peer with the layout that peer names,
dials with the layout of the blocks it pushes (one connection per peer and layout), and lands
each ticket in the caches expect() names, refusing data whose connection agreed on another layout.

Which side does what lives in KVSender (sender.py) and KVReceiver (receiver.py); the transport
routes control messages between them and the connections. Accepting a dialing peer (the handshake's
answer, the offer of our caches, closing the listener) is Accepting's (accept.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import torch
import ucxx

from engine.cpu_threads import one_thread_here
from engine.kv_layout import KVLayout
from kvtransfer import ucx_context
from kvtransfer.accept import Accepting
from kvtransfer.caches import KVCaches
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Connection, Tasks
from kvtransfer.dial import Dialer
from kvtransfer.ipc import LostExports, host_identity
from kvtransfer.push import KVPush
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.side import SideListener
from kvtransfer.telemetry import NullObserver, TransferObserver
from kvtransfer.ticket import Ticket
from kvtransfer.ticket_import import TicketImport
from kvtransfer.timeline import Timeline
from kvtransfer.warm import WarmPeers
from kvtransfer.wire import (
    AskWrite,
    Cancel,
    Data,
    Done,
    Failed,
    Granted,
    Hello,
    Hold,
    Message,
    Stopped,
    Unmapped,
    Written,
)

log = structlog.get_logger(__name__)


class KVTransport(Accepting):
    """Start with start() (or `with`), stop with close(). kv_caches enables the receiving side;
    layout None makes a transport for blocks of any layout (a KV store), always receiving, into the
    caches each expect() names."""

    def __init__(
        self,
        layout: KVLayout | None,
        config: TransportConfig,
        kv_caches: Sequence[torch.Tensor] | None = None,
        observer: TransferObserver | None = None,
    ) -> None:
        self.layout = layout
        self.config = config
        self.instance = uuid.uuid4().hex
        self._caches: KVCaches | None = None
        if kv_caches is not None:
            if layout is None:
                raise ValueError("kv_caches need their layout: pass it, or no caches for a transport of any layout")
            self._caches = KVCaches(layout, kv_caches)
        self._receiving = kv_caches is not None or layout is None
        self._observer: TransferObserver = observer or NullObserver()
        self.timeline = Timeline(config.record_timeline)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._listener: Any = None
        self._port = 0
        self._tasks = Tasks()
        self._dialer = Dialer(config, self._hello, self._route, self._lost, self._tasks)
        self._accepted: set[Connection] = set()
        self._greeting: set[Any] = set()  # accepted ucxx endpoints whose handshake is under way
        self._sender: KVSender | None = None
        self._receiver: KVReceiver | None = None
        self._warm: WarmPeers | None = None
        # direct writes (ipc.py): who may share CUDA memory with us (our caches go to each such
        # dialer in an export of its own)
        self._host = host_identity() if config.direct_writes_on else ""
        self._lost_exports = LostExports()  # exports of lost connections whose peer may still map them
        self._side: SideListener | None = None  # direct writes' messages from same-host writers (side.py)

    # ---- lifecycle (any thread)
    def start(self, timeout_s: float = 30.0) -> KVTransport:
        ucx_context.claim(self)
        self._thread = threading.Thread(target=self._run, name="kvtransfer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._startup_error is not None:
            self.close()
            raise RuntimeError(f"the KV transport did not start: {self._startup_error!r}")
        log.info(
            "kv transport listening",
            address=self.address,
            ucx_tls=self.config.ucx_tls,
            progress=self.config.progress_mode.value,
        )
        return self

    def close(self, timeout_s: float = 30.0) -> None:
        """Fail what is in flight, close every connection and the listener, stop the thread."""
        loop, thread = self._loop, self._thread
        if thread is None:
            return
        if loop is not None and self._stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("kv transport thread did not stop", timeout_s=timeout_s)
        self._thread = None
        ucx_context.release(self)

    def __enter__(self) -> KVTransport:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the two sides (any thread)
    @property
    def address(self) -> str:
        """This worker's listener, "host:port": what a Ticket carries and peers dial."""
        return f"{self.config.host}:{self._port}"

    @property
    def num_in_flight(self) -> int:
        """Tickets being pushed or received now (read from any thread: a snapshot, not a lock)."""
        sending = len(self._sender) if self._sender is not None else 0
        return sending + (len(self._receiver) if self._receiver is not None else 0)

    @property
    def peers(self) -> list[str]:
        """The peers this transport holds a live dialed connection to (a snapshot, any thread)."""
        return sorted({peer for (peer, _), conn in list(self._dialer.connections.items()) if conn.lost is None})

    @property
    def side_channels(self) -> int:
        """Live dialed connections whose direct-write messages take a side channel (side.py; a snapshot)."""
        live = [c for c in list(self._dialer.connections.values()) if c.lost is None]
        return sum(1 for c in live if c.side is not None and c.side.open)

    @property
    def dials(self) -> int:
        """Connections this transport dialed (a snapshot, any thread)."""
        return self._dialer.dials

    @property
    def preconnected(self) -> int:
        """Connections opened ahead of any ticket by preconnect() (a snapshot, any thread)."""
        return self._warm.opened if self._warm is not None else 0

    def preconnect(self, peers: Sequence[str]) -> None:
        """Keep a connection open to each of `peers` (KV listeners, "host:port") for this transport's
        layout, made in the background now; close the idle ones to peers left out since the last
        call. Returns at once, from any thread; a peer that cannot be reached is tried again later."""
        loop, stopping = self._loop, self._stopping
        if self.layout is None:
            raise ValueError("a transport of any layout has no layout to connect with: name peers to a worker's")
        if loop is None or stopping is None or loop.is_closed() or stopping.is_set():
            return
        wanted = frozenset(p for p in peers if p != self.address)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the transport is gone
            loop.call_soon_threadsafe(self._want, wanted)

    def _want(self, peers: frozenset[str]) -> None:
        # never dial once stopping: ucxx must not create an endpoint while the transport tears down
        if self._warm is not None and self._stopping is not None and not self._stopping.is_set():
            self._warm.want(peers)

    @property
    def sender(self) -> KVSender:
        if self._sender is None:
            raise RuntimeError("the transport is not running: call start() first")
        return self._sender

    @property
    def receiver(self) -> KVReceiver:
        if self._receiver is None:
            raise RuntimeError("this transport has no receiving side: pass kv_caches and call start()")
        return self._receiver

    def push(self, ticket: Ticket, layout: KVLayout | None = None) -> KVPush:
        """The sending side of a ticket another worker expects (an engine.handoff.KVExportSink);
        `layout` is the pushed blocks' when it is not this transport's own."""
        return self.sender.open(ticket, layout)

    def expect(
        self,
        ticket_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float,
        on_expire: Callable[[TicketImport], None] | None = None,
        caches: KVCaches | None = None,
    ) -> TicketImport:
        """The receiving side of a ticket (an engine.handoff.KVImport), leased for timeout_s; hand
        its .ticket to the sender. on_expire, caches: see KVReceiver.expect."""
        return self.receiver.expect(ticket_id, block_ids, num_tokens, timeout_s, on_expire, caches)

    async def expect_async(
        self,
        ticket_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float,
        on_expire: Callable[[TicketImport], None] | None = None,
        caches: KVCaches | None = None,
    ) -> TicketImport:
        return await self.receiver.expect_async(ticket_id, block_ids, num_tokens, timeout_s, on_expire, caches)

    # ---- the loop thread
    def _run(self) -> None:
        if self.config.one_torch_thread:
            one_thread_here()
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            ucx_context.init(self.config)  # on this loop: ucxx binds its notifier to the loop running at init
            self._listener = ucxx.create_listener(
                self._accept, port=self.config.port or None, connect_timeout=self.config.connect_timeout_s
            )
            self._port = self._listener.port
            self._sender = KVSender(
                self.layout, self.config, self._observer, loop, self._tasks, self._dialer.connect, self.timeline
            )
            if self.layout is not None:
                self._warm = WarmPeers(self.layout, self._dialer.connect, self._connected, self._in_use, self._tasks)
            if self._receiving:
                self._receiver = KVReceiver(
                    self._caches, self.config, self._observer, loop, self._tasks, self.address, self.timeline
                )
            if self._host and self.config.side_channel and self._caches is not None:
                side = SideListener(loop)
                self._side = side if await side.start() else None
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            await self._teardown()
            return
        self._ready.set()
        await self._stopping.wait()
        await self._teardown()

    async def _teardown(self) -> None:
        await self._close_listener()
        if self._sender is not None:
            self._sender.shutdown()  # after it no direct write can run: the peers' caches go now
        if self._receiver is not None:
            self._receiver.shutdown()
        for conn in [*self._dialer.connections.values(), *self._accepted]:
            conn.abort("the transport closed")
            if conn.peer_caches is not None:
                # Now, not whenever this process's objects go: torch counts each mapping's release
                # in memory the exporting peer reads at its exit, and one not released by then
                # makes it warn "Producer process has been terminated before all shared CUDA
                # tensors released" (a torch.multiprocessing refcount: kvtransfer/ipc.py).
                conn.peer_caches.close()
        self._lost_exports.sweep()  # peers SIGKILLed while they mapped our caches: their counts, now
        await self._tasks.cancel_all()
        await self._dialer.cancel()
        if self._side is not None:
            self._side.close()
        self._dialer.connections.clear()
        self._accepted.clear()
        await ucx_context.reset()

    def _hello(self, layout: KVLayout) -> Hello:
        """What this transport says first on a connection it dials (dial.py)."""
        return Hello(self.address, self.instance, layout, self._host, os.getpid() if self._host else 0)

    def _connected(self, address: str) -> Connection | None:
        assert self.layout is not None
        return self._dialer.connected(address, self.layout)

    def _in_use(self, conn: Connection) -> bool:
        return self._sender is not None and self._sender.uses(conn)

    def _route(self, conn: Connection, message: Message) -> None:
        if isinstance(message, Hold | Data | Cancel | AskWrite | Written | Stopped):
            if self._receiver is None:
                conn.abort("a peer sent KV to a worker with no receiving side")
                return
            self._receiver.on_message(conn, message)
        elif isinstance(message, Done | Failed | Granted):
            self.sender.on_message(conn, message)
        elif isinstance(message, Unmapped):
            if conn.export is not None:  # the dialer never maps it: its counts are ours to take down, once
                conn.export.withdraw()
        else:
            conn.abort(f"unexpected {message.kind} message after the handshake")

    def _lost(self, conn: Connection, reason: str) -> None:
        self._dialer.forget(conn)
        self._accepted.discard(conn)
        if conn.export is not None:
            conn.export.close()  # torch frees its shares once the peer's mapping has gone too
            self._lost_exports.add(conn.export)  # or once we see the peer's process gone
        log.info("kv peer connection lost", peer=conn.peer, reason=reason)
        if self._sender is not None:
            self._sender.on_lost(conn, reason)
        if self._receiver is not None:
            self._receiver.on_lost(conn, reason)

