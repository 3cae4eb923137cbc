"""The handshake every new UCX connection opens with, both sides of it.

The dialer sends a Hello (its listener address, process instance, the layout of the blocks it
will move, and its host identity when it could write into a same-host peer's GPU cache); the
listener answers Welcome with its own layout (and, for a same-host GPU dialer, its caches' CUDA
IPC export on EXPORT_TAG, and its side channel with a token for this connection: side.py) or
Refuse naming the first field where the layouts differ. A layout mismatch is an IncompatiblePeer
on the dialer's side and a logged refusal on the listener's. A same-host dialer whose export does
not come in time says Unmapped and never maps it (the receiver takes its counts down for it).

Only the exchange lives here; the transport (transport.py) turns a handshaken endpoint into a
Connection and keeps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from engine.kv_layout import KVLayout
from kvtransfer.connection import CTL_TAG
from kvtransfer.errors import IncompatiblePeer
from kvtransfer.ipc import EXPORT_TAG, CacheExport, PeerCaches, map_peer, release_export
from kvtransfer.wire import FRAME_BYTES, Hello, Refuse, Unmapped, Welcome, decode, encode

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Offer:
    """What the listener gives a same-host GPU dialer: its caches' export (made for this one
    connection: ipc.CacheExport), and its side channel."""

    export: CacheExport
    side_channel: str = ""  # our side channel's socket and this connection's token for it (side.py)
    side_token: str = ""


@dataclass(frozen=True)
class Greeted:
    """A dialer the listener welcomed: its Hello, the layout agreed, what we offered it if anything."""

    hello: Hello
    layout: KVLayout
    offer: Offer | None


async def greet(
    ep: Any, hello: Hello, address: str, device: torch.device, timeout: float
) -> tuple[Welcome, PeerCaches | None]:
    """Dialer side, on a new endpoint to `address`: (the Welcome, the peer's caches mapped when it
    exported them). Raises IncompatiblePeer when the peer's layout differs or it refused us."""
    await asyncio.wait_for(ep.send(encode(hello), tag=CTL_TAG), timeout)
    frame = bytearray(FRAME_BYTES)
    await asyncio.wait_for(ep.recv(frame, tag=CTL_TAG), timeout)
    reply = decode(frame)
    blob = None
    if isinstance(reply, Welcome) and reply.export_bytes > 0:
        blob = await _export(ep, reply.export_bytes, address, timeout)
    if not isinstance(reply, Welcome | Refuse):
        raise ValueError(f"the peer answered the handshake with {reply.kind}")
    difference = hello.layout.first_difference(reply.layout)
    if isinstance(reply, Refuse):
        difference = difference or reply.difference
    if difference is not None or isinstance(reply, Refuse):
        if blob is not None:
            release_export(blob)  # not mapped: the peer's torch counts its shares until we say so
        raise IncompatiblePeer(address, "", difference or "")
    return reply, None if blob is None else map_peer(address, blob, hello.layout, device)


async def _export(ep: Any, nbytes: int, address: str, timeout: float) -> bytes | None:
    """The export a Welcome announced, or None when it did not come in time: the peer may have
    sent it, and cannot tell a dialer that lost it from one that mapped it, so we tell it (Unmapped,
    the connection's first frame) and never map it, even if its bytes come later (nothing
    receives on EXPORT_TAG again). The connection then carries KV over UCX."""
    received = bytearray(nbytes)
    try:
        await asyncio.wait_for(ep.recv(received, tag=EXPORT_TAG), timeout)
    except TimeoutError:
        log.warning("kv cache export not received in time: KV goes over UCX", peer=address, timeout_s=timeout)
        await asyncio.wait_for(ep.send(encode(Unmapped()), tag=CTL_TAG), timeout)
        return None
    return bytes(received)


async def answer(
    ep: Any,
    layout: KVLayout | None,
    address: str,
    instance: str,
    offer_for: Callable[[Hello], Offer | None],
    timeout: float,
) -> Greeted | None:
    """Listener side, on an endpoint a peer dialed: read its Hello and welcome it (with our export
    when `offer_for` gives one), or refuse it. `layout` None (a KV store) takes the dialer's.
    None when the peer was refused or the handshake failed (the endpoint is aborted then)."""
    try:
        frame = bytearray(FRAME_BYTES)
        await asyncio.wait_for(ep.recv(frame, tag=CTL_TAG), timeout)
        hello = decode(frame)
        if not isinstance(hello, Hello):
            raise ValueError(f"a peer opened with {hello.kind} instead of hello")
        agreed = layout or hello.layout  # a store takes each peer's own
        difference = agreed.first_difference(hello.layout)
        if difference is not None:
            log.warning("kv peer refused", peer=hello.name, difference=difference)
            await ep.send(encode(Refuse(agreed, difference)), tag=CTL_TAG)
            # the dialer hangs up once it has read the refusal; its hang-up ends this receive
            await asyncio.wait_for(ep.recv(bytearray(FRAME_BYTES), tag=CTL_TAG), timeout)
            return None
        offer = offer_for(hello)
        export_bytes = len(offer.export.blob) if offer is not None else 0
        side, token = (offer.side_channel, offer.side_token) if offer is not None else ("", "")
        try:
            await ep.send(encode(Welcome(address, instance, agreed, export_bytes, side, token)), tag=CTL_TAG)
            if offer is not None:
                await asyncio.wait_for(ep.send(bytearray(offer.export.blob), tag=EXPORT_TAG), timeout)
        except BaseException:
            if offer is not None:
                offer.export.withdraw()  # the dialer has not got it: nobody else will count it down
            raise
    except Exception as e:
        log.info("kv peer handshake ended", error=f"{type(e).__name__}: {e}")
        ep.abort()
        return None
    return Greeted(hello, agreed, offer)
