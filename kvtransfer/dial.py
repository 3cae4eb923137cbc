"""The connections a KVTransport dials: one per peer and layout, kept until lost.

A dial is a ucxx endpoint, then the handshake (handshake.greet: the layouts compared, a same-host
peer's caches mapped for direct writes), then, where both ends offer it, the same-host side
channel for a direct write's messages (side.py). Callers asking for a peer whose dial is under way share
that dial; a connection found lost is dialed again by the next caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
import torch
import ucxx

from engine.kv_layout import KVLayout
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Connection, Tasks
from kvtransfer.handshake import greet
from kvtransfer.ipc import PeerCaches
from kvtransfer.side import SideChannel, close_quietly, dial_side
from kvtransfer.wire import Hello, Message

log = structlog.get_logger("kvtransfer.transport")

_Key = tuple[str, KVLayout]  # (the peer's listener address, the layout the connection agreed on)


class Dialer:
    def __init__(
        self,
        config: TransportConfig,
        hello: Callable[[KVLayout], Hello],  # what this transport says first, for a layout
        on_message: Callable[[Connection, Message], None],
        on_lost: Callable[[Connection, str], None],
        tasks: Tasks,
    ) -> None:
        self.config = config
        self._hello = hello
        self._on_message = on_message
        self._on_lost = on_lost
        self._tasks = tasks
        self.connections: dict[_Key, Connection] = {}
        self._dialing: dict[_Key, asyncio.Task[Connection]] = {}
        self.dials = 0  # connections dialed (read from any thread: a snapshot)

    async def connect(self, address: str, layout: KVLayout) -> Connection:
        key = (address, layout)
        conn = self.connections.get(key)
        if conn is not None and conn.lost is None:
            return conn
        dialing = self._dialing.get(key)
        if dialing is None:
            dialing = asyncio.get_running_loop().create_task(self._dial(address, layout))
            self._dialing[key] = dialing
            dialing.add_done_callback(lambda _: self._dialing.pop(key, None))
        return await asyncio.shield(dialing)

    def connected(self, address: str, layout: KVLayout) -> Connection | None:
        conn = self.connections.get((address, layout))
        return conn if conn is not None and conn.lost is None else None

    def forget(self, conn: Connection) -> None:
        """A lost connection: the next connect() to its peer dials again."""
        if self.connections.get((conn.peer, conn.layout)) is conn:
            del self.connections[(conn.peer, conn.layout)]

    async def cancel(self) -> None:
        """Cancel the dials in flight and wait for them to end. A cancelled dial keeps its
        CancelledError, whose traceback holds ucxx's create_endpoint frame and through it the UCX
        context: ucxx.reset() fails ("not all Endpoints ... are closed") while anything still
        refers to the task, a local of the caller's included, hence a function of its own."""
        dials = list(self._dialing.values())
        for dial in dials:
            dial.cancel()
        await asyncio.gather(*dials, return_exceptions=True)
        self._dialing.clear()

    async def _dial(self, address: str, layout: KVLayout) -> Connection:
        host, port = address.rsplit(":", 1)
        timeout = self.config.connect_timeout_s
        ep = await asyncio.wait_for(ucxx.create_endpoint(host, int(port), connect_timeout=timeout), timeout)
        channel: SideChannel | None = None
        peer_caches: PeerCaches | None = None
        try:
            device = torch.device(self.config.device)
            reply, peer_caches = await greet(ep, self._hello(layout), address, device, timeout)
            if peer_caches is not None and reply.side_channel and self.config.side_channel:
                channel = await dial_side(reply.side_channel, reply.side_token, timeout)
        except BaseException:
            ep.abort()
            close_quietly(channel)
            if peer_caches is not None:
                peer_caches.close()  # now, not when this frame's traceback goes: torch counts our mapping
            raise
        conn = Connection(ep, address, reply.instance, layout, self._on_message, self._on_lost)
        conn.peer_caches = peer_caches
        if channel is not None:
            conn.attach_side(channel)
        conn.start(self._tasks)
        self.connections[(address, layout)] = conn
        self.dials += 1
        log.info("kv peer connected", peer=address, instance=reply.instance, direct_writes=peer_caches is not None,
                 side_channel=channel is not None)  # fmt: skip
        return conn
