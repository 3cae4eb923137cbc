"""The accepting side of a KVTransport, on its loop (KVTransport's part): the listener's callback,
the offer of our caches to a same-host dialer, and closing the listener.

A dialing peer's Hello is answered with Welcome or Refuse (handshake.answer); a dialer of our host
identity whose caches are on a GPU, as ours, is offered an export of our caches of its own
(ipc.CacheExport) and our side channel with a token for its connection (side.py). A connection
that arrives while the transport closes, or on a non-loopback address of a loopback-only worker,
is aborted before the handshake.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from engine.kv_layout import KVLayout
from kvtransfer.caches import KVCaches
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Connection, Tasks
from kvtransfer.handshake import Offer, answer
from kvtransfer.ipc import LostExports, export_caches, exportable
from kvtransfer.listen import arrived_on_loopback, local_address
from kvtransfer.side import SideListener
from kvtransfer.wire import Hello, Message

log = structlog.get_logger(__name__)

_ACCEPT_POLL_S = 0.01  # while closing: how often to look whether the listener's accepts have ended


class Accepting:
    """KVTransport's accepting half: the attributes and methods below the stubs are KVTransport's."""

    layout: KVLayout | None
    config: TransportConfig
    instance: str
    _caches: KVCaches | None
    _stopping: asyncio.Event | None
    _listener: Any
    _tasks: Tasks
    _accepted: set[Connection]
    _greeting: set[Any]  # accepted ucxx endpoints whose handshake is under way
    _host: str
    _lost_exports: LostExports
    _side: SideListener | None

    @property
    def address(self) -> str:
        raise NotImplementedError

    def _route(self, conn: Connection, message: Message) -> None:
        raise NotImplementedError

    def _lost(self, conn: Connection, reason: str) -> None:
        raise NotImplementedError

    def _offer(self, hello: Hello) -> Offer | None:
        """An export of our caches for a dialer that can map them (same host identity, both on
        GPUs), its own (torch counts each export's one mapping: ipc.CacheExport), and our side
        channel with a token for its connection."""
        caches = self._caches
        if not (self._host and hello.host == self._host and caches is not None and exportable(caches.tensors)):
            return None
        try:
            export = export_caches(caches.tensors)
            export.peer_pid = hello.pid
        except Exception as e:
            log.warning("kv caches cannot be exported: KV comes over UCX", error=f"{type(e).__name__}: {e}")
            self._host = ""
            return None
        if self._side is None:
            return Offer(export)
        return Offer(export, self._side.name, self._side.offer())

    async def _accept(self, ep: Any) -> None:
        """Listener callback: the dialing peer's Hello, then Welcome or Refuse."""
        timeout = self.config.connect_timeout_s
        if self._stopping is None or self._stopping.is_set():  # arrived while the transport closes
            ep.abort()
            return
        if self.config.accepts_loopback_only and not arrived_on_loopback(ep):
            log.warning("kv connection refused: this worker accepts loopback peers only",
                        local=local_address(ep.ucp_endpoint))  # fmt: skip
            ep.abort()
            return
        self._greeting.add(ep)
        try:
            greeted = await answer(ep, self.layout, self.address, self.instance, self._offer, timeout)
        finally:
            self._greeting.discard(ep)
        if greeted is None or self._stopping.is_set():
            if greeted is not None:
                ep.abort()
                if greeted.offer is not None:
                    greeted.offer.export.close()
                    self._lost_exports.add(greeted.offer.export)  # the peer may have mapped it already
            return
        hello = greeted.hello
        conn = Connection(ep, hello.name, hello.instance, greeted.layout, self._route, self._lost)
        offer = greeted.offer
        conn.export = offer.export if offer is not None else None
        if offer is not None and offer.side_token and self._side is not None:
            self._side.expect(offer.side_token, conn.attach_side)
        conn.start(self._tasks)
        self._accepted.add(conn)

    async def _close_listener(self) -> None:
        """Close the listener first and wait for the connections it was accepting: a peer that
        dials while the transport closes (its list still names this worker) leaves an endpoint in
        ucxx's accept handler or in our handshake, and ucxx.reset() with such an endpoint alive
        crashed the process (SIGSEGV in reset or at exit, ~5 in 8 closes under a peer dialing
        every 10 ms, in a stress script). From _stopping on, _accept refuses at once;
        the handshakes under way are aborted, and the handlers given connect_timeout_s to end."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        for ep in list(self._greeting):
            ep.abort()
        deadline = asyncio.get_running_loop().time() + self.config.connect_timeout_s
        while listener.active_clients and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(_ACCEPT_POLL_S)
        if listener.active_clients:
            log.warning("kv listener closed with connections still being accepted", count=listener.active_clients)
