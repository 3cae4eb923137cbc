"""KVTransport: one worker's UCX listener, connections, and the thread its event loop runs on.

UCX (through ucxx's asyncio API) runs on an event loop in a thread of its own, so the engine's
step thread and a gRPC service's event loop both call in thread-safely. The transport owns the
process-wide ucxx context (one per process: ucxx keeps it global), the listener peers dial, and
one cached connection per peer it dials; a connection that is lost (the peer died or restarted)
is dropped and the next ticket to that peer dials again. Every new connection starts with a
handshake comparing KV layouts; a peer whose layout differs is refused, naming the field.

A worker's transport has one layout, its engine's. A KV store's (layout None) holds
blocks of every layout its clients bring: it accepts each peer with the layout that peer names,
dials with the layout of the blocks it pushes (one connection per peer and layout), and lands
each ticket in the caches expect() names, refusing data whose connection agreed on another layout.

Which side does what lives in KVSender (sender.py) and KVReceiver (receiver.py); the transport
routes control messages between them and the connections.
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

from engine.kv_layout import KVLayout
from kvtransfer.caches import KVCaches
from kvtransfer.config import TransportConfig
from kvtransfer.connection import CTL_TAG, Connection, Tasks
from kvtransfer.errors import IncompatiblePeer
from kvtransfer.ipc import EXPORT_TAG, export_caches, exportable, host_identity, map_peer
from kvtransfer.listen import arrived_on_loopback, local_address
from kvtransfer.push import KVPush
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.telemetry import NullObserver, TransferObserver
from kvtransfer.ticket import Ticket
from kvtransfer.ticket_import import TicketImport
from kvtransfer.timeline import Timeline
from kvtransfer.wire import (
    FRAME_BYTES,
    AskWrite,
    Cancel,
    Data,
    Done,
    Failed,
    Granted,
    Hello,
    Hold,
    Message,
    Refuse,
    Stopped,
    Welcome,
    Written,
    decode,
    encode,
)

log = structlog.get_logger(__name__)

_process_lock = threading.Lock()  # ucxx has one context per process, so one transport at a time
_process_transport: KVTransport | None = None


class KVTransport:
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
        self._dialed: dict[tuple[str, KVLayout], Connection] = {}
        self._dialing: dict[tuple[str, KVLayout], asyncio.Task[Connection]] = {}
        self._accepted: set[Connection] = set()
        self._sender: KVSender | None = None
        self._receiver: KVReceiver | None = None
        # direct writes (ipc.py): who may share CUDA memory with us, and our caches' export, made once
        self._host = host_identity() if config.direct_writes_on else ""
        self._export: bytes | None = None

    # ---- lifecycle (any thread)
    def start(self, timeout_s: float = 30.0) -> KVTransport:
        global _process_transport
        with _process_lock:
            if _process_transport is not None:
                raise RuntimeError("a KVTransport is already running in this process (ucxx allows one context)")
            _process_transport = self
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
        global _process_transport
        loop, thread = self._loop, self._thread
        if thread is None:
            return
        if loop is not None and self._stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stopping.set)
        thread.join(timeout_s)
        if thread.is_alive():
            log.error("kv transport thread did not stop", timeout_s=timeout_s)
        self._thread = None
        with _process_lock:
            if _process_transport is self:
                _process_transport = None

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
            _drop_stale_ucx_variable()
            # ucxx binds its notifier to the loop running at init: it must be this one
            ucxx.init(
                options=self.config.ucx_init_options,
                progress_mode=self.config.progress_mode.value,
                enable_delayed_submission=self.config.delayed_submission_on,
                enable_python_future=True,
            )
            self._listener = ucxx.create_listener(
                self._accept, port=self.config.port or None, connect_timeout=self.config.connect_timeout_s
            )
            self._port = self._listener.port
            self._sender = KVSender(
                self.layout, self.config, self._observer, loop, self._tasks, self._connect, self.timeline
            )
            if self._receiving:
                self._receiver = KVReceiver(
                    self._caches, self.config, self._observer, loop, self._tasks, self.address, self.timeline
                )
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            await self._teardown()
            return
        self._ready.set()
        await self._stopping.wait()
        await self._teardown()

    async def _teardown(self) -> None:
        if self._sender is not None:
            self._sender.shutdown()
        if self._receiver is not None:
            self._receiver.shutdown()
        for conn in [*self._dialed.values(), *self._accepted]:
            conn.abort("the transport closed")
        await self._tasks.cancel_all()
        for task in list(self._dialing.values()):
            task.cancel()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._dialed.clear()
        self._accepted.clear()
        with contextlib.suppress(Exception):  # private ucxx API, only a speed-up and quiet: see below
            _stop_notifier(ucxx.core._ctx)
        for _ in range(3):  # the notifier's last wake-ups were posted to this loop: run them before it closes
            await asyncio.sleep(0)
        try:
            ucxx.reset()
        except Exception as e:  # a reference still held somewhere; the process can go on
            log.warning("ucxx reset incomplete", error=str(e))

    async def _connect(self, address: str, layout: KVLayout) -> Connection:
        key = (address, layout)
        conn = self._dialed.get(key)
        if conn is not None and conn.lost is None:
            return conn
        dialing = self._dialing.get(key)
        if dialing is None:
            dialing = asyncio.get_running_loop().create_task(self._dial(address, layout))
            self._dialing[key] = dialing
            dialing.add_done_callback(lambda _: self._dialing.pop(key, None))
        return await asyncio.shield(dialing)

    async def _dial(self, address: str, layout: KVLayout) -> Connection:
        host, port = address.rsplit(":", 1)
        timeout = self.config.connect_timeout_s
        ep = await asyncio.wait_for(ucxx.create_endpoint(host, int(port), connect_timeout=timeout), timeout)
        try:
            hello = Hello(self.address, self.instance, layout, self._host)
            await asyncio.wait_for(ep.send(encode(hello), tag=CTL_TAG), timeout)
            frame = bytearray(FRAME_BYTES)
            await asyncio.wait_for(ep.recv(frame, tag=CTL_TAG), timeout)
            reply = decode(frame)
            peer_caches = None
            if isinstance(reply, Welcome) and reply.export_bytes > 0:
                blob = bytearray(reply.export_bytes)
                await asyncio.wait_for(ep.recv(blob, tag=EXPORT_TAG), timeout)
                peer_caches = map_peer(address, bytes(blob), layout, torch.device(self.config.device))
            if not isinstance(reply, Welcome | Refuse):
                raise ValueError(f"the peer answered the handshake with {reply.kind}")
            difference = layout.first_difference(reply.layout)
            if difference is not None:
                raise IncompatiblePeer(address, "", difference)
            if isinstance(reply, Refuse):
                raise IncompatiblePeer(address, "", reply.difference)
        except BaseException:
            ep.abort()
            raise
        conn = Connection(ep, address, reply.instance, layout, self._route, self._lost)
        conn.peer_caches = peer_caches
        conn.start(self._tasks)
        self._dialed[(address, layout)] = conn
        log.info("kv peer connected", peer=address, instance=reply.instance, direct_writes=peer_caches is not None)
        return conn

    def _offers_export(self, hello: Hello) -> bytes | None:
        """Our caches' export for a dialer that can map them: same host identity, both on GPUs."""
        caches = self._caches
        if not (self._host and hello.host == self._host and caches is not None and exportable(caches.tensors)):
            return None
        if self._export is None:
            try:
                self._export = export_caches(caches.tensors)
            except Exception as e:
                log.warning("kv caches cannot be exported: KV comes over UCX", error=f"{type(e).__name__}: {e}")
                self._host = ""
                return None
        return self._export

    async def _accept(self, ep: Any) -> None:
        """Listener callback: the dialing peer's Hello, then Welcome or Refuse."""
        timeout = self.config.connect_timeout_s
        if self.config.accepts_loopback_only and not arrived_on_loopback(ep):
            log.warning("kv connection refused: this worker accepts loopback peers only",
                        local=local_address(ep.ucp_endpoint))  # fmt: skip
            ep.abort()
            return
        try:
            frame = bytearray(FRAME_BYTES)
            await asyncio.wait_for(ep.recv(frame, tag=CTL_TAG), timeout)
            hello = decode(frame)
            if not isinstance(hello, Hello):
                raise ValueError(f"a peer opened with {hello.kind} instead of hello")
            layout = self.layout or hello.layout  # a store takes each peer's own
            difference = layout.first_difference(hello.layout)
            if difference is not None:
                log.warning("kv peer refused", peer=hello.name, difference=difference)
                await ep.send(encode(Refuse(layout, difference)), tag=CTL_TAG)
                # the dialer hangs up once it has read the refusal; its hang-up ends this receive
                await asyncio.wait_for(ep.recv(bytearray(FRAME_BYTES), tag=CTL_TAG), timeout)
                return
            export = self._offers_export(hello)
            welcome = Welcome(self.address, self.instance, layout, len(export) if export else 0)
            await ep.send(encode(welcome), tag=CTL_TAG)
            if export:
                await asyncio.wait_for(ep.send(bytearray(export), tag=EXPORT_TAG), timeout)
        except Exception as e:
            log.info("kv peer handshake ended", error=f"{type(e).__name__}: {e}")
            ep.abort()
            return
        conn = Connection(ep, hello.name, hello.instance, layout, self._route, self._lost)
        conn.export_offered = export is not None
        conn.start(self._tasks)
        self._accepted.add(conn)

    def _route(self, conn: Connection, message: Message) -> None:
        if isinstance(message, Hold | Data | Cancel | AskWrite | Written | Stopped):
            if self._receiver is None:
                conn.abort("a peer sent KV to a worker with no receiving side")
                return
            self._receiver.on_message(conn, message)
        elif isinstance(message, Done | Failed | Granted):
            self.sender.on_message(conn, message)
        else:
            conn.abort(f"unexpected {message.kind} message after the handshake")

    def _lost(self, conn: Connection, reason: str) -> None:
        if self._dialed.get((conn.peer, conn.layout)) is conn:
            del self._dialed[(conn.peer, conn.layout)]
        self._accepted.discard(conn)
        log.info("kv peer connection lost", peer=conn.peer, reason=reason)
        if self._sender is not None:
            self._sender.on_lost(conn, reason)
        if self._receiver is not None:
            self._receiver.on_lost(conn, reason)


def _drop_stale_ucx_variable() -> None:
    """ucxx sets UCX_MEMTYPE_CACHE=n in this process's environment when imported, for the UCX
    releases that had that option; UCX 1.20 has none and warns about the unknown variable at every
    start. The value has no effect there, so it goes before UCX reads the environment."""
    if ucxx.get_ucx_version() >= (1, 20) and os.environ.get("UCX_MEMTYPE_CACHE") == "n":
        del os.environ["UCX_MEMTYPE_CACHE"]


def _stop_notifier(ctx: Any) -> None:
    """Stop ucxx's notifier thread now, and leave it marked stopped.

    ucxx.reset() stops the thread too, but only at the thread's next 1 s poll, and the thread
    consumes the stop request on its way out, which leaves the C++ notifier marked running: the
    worker's destructor then warns at process exit ("The notifier thread should be explicitly
    stopped"). So: wake it, join it, mark it stopped again."""
    if ctx is None:
        return
    ctx.worker.stop_request_notifier_thread()
    ctx.stop_notifier_thread()
    ctx.worker.stop_request_notifier_thread()
