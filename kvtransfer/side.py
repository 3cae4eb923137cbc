"""A same-host side channel beside a direct-write connection: a direct write's messages over a Unix socket.

A ucxx control frame takes ~0.4 ms from one transport's loop to the other's (UCX's progress
thread, ucxx's notifier thread, then the loop: BENCHMARKS.md, "Where a ticket's fixed cost
goes"), and a direct-write ticket waits for four of them: its AskWrite, the receiver's Granted
(and then a payload of its block ids), its Written and the receiver's Done. A Unix socket served on
the receiving transport's own loop wakes that loop from its epoll at once. So between GPU workers
of one host (the connections that map the receiver's caches), those messages take a socket of
their own, and the Granted carries the ticket's block ids inline (up to MAX_INLINE_IDS of them);
every other message (Hold, Data, Cancel, Failed, Stopped), and every payload, keeps UCX.

The receiving transport listens on one abstract Unix socket (a name in its network namespace, no
file) and, in each Welcome that offers direct writes, names it with a random token for that
connection. The dialer connects and sends the token first; the listener binds the socket to the
connection that token was made for. The token is the only credential: it travelled over the
connection itself. Anything that fails (another network namespace, a refused connect) leaves that
connection's direct-write messages on UCX frames. A side channel that closes takes its connection
down with it (the peer died), and a connection lost closes its side channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
import threading
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from kvtransfer.wire import AskWrite, Done, Granted, Message, Written, decode_body, encode_body

log = structlog.get_logger(__name__)

TOKEN_BYTES = 16
_LENGTH = struct.Struct("<I")
_MAX_BODY = 1 << 16  # the hard bound on one message, both ways: a larger one is refused, never sent
# A Granted's inline ids: 2,048 (32k tokens at 16 a block) are ~22 KB of base64, under _MAX_BODY
# and under the ~32 KB a Unix stream socket takes in one segment, so a grant goes out whole or, when
# the buffer is full, not at all (ChannelFull: it then takes UCX) — a write that went out in part
# would close the channel. A larger ticket's grant names a tag instead, and its ids follow as a UCX payload.
MAX_INLINE_IDS = 2048
_BIND_S = 10.0  # a socket whose token names no connection within this is closed


class ChannelFull(ConnectionError):
    """Nothing was written: the socket's buffer is full. The channel stays open."""


class SideChannel(asyncio.Protocol):
    """One end of a side channel: length-prefixed JSON messages of the kinds `allowed`."""

    def __init__(
        self, allowed: tuple[type[Message], ...], on_token: Callable[[SideChannel, bytes], None] | None
    ) -> None:
        self.allowed = allowed
        self.open = False
        self._on_token = on_token  # the listener's end reads the dialer's token first
        self._on_message: Callable[[Message], None] | None = None
        self._on_lost: Callable[[str], None] | None = None
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._write_lock = threading.Lock()
        self._fd: int | None = None  # our duplicate of the socket's descriptor: every write goes through it
        self._buffer = bytearray()
        self._held: list[Message] = []  # arrived before the channel was bound to its connection

    def bind(self, on_message: Callable[[Message], None], on_lost: Callable[[str], None]) -> None:
        self._on_message, self._on_lost = on_message, on_lost
        held, self._held = self._held, []
        for message in held:
            on_message(message)
        if not self.open:
            on_lost("the side channel closed")

    def send(self, message: Message) -> None:
        """Write one message now, from any thread; ConnectionError if the channel is (now) closed,
        ValueError (nothing written, the channel stays open) if it exceeds _MAX_BODY."""
        body = encode_body(message)
        if len(body) > _MAX_BODY:
            raise ValueError(f"a {message.kind} message of {len(body)} bytes exceeds the side channel's {_MAX_BODY}")
        self.send_raw(_LENGTH.pack(len(body)) + body)

    def send_raw(self, data: bytes) -> None:
        """ChannelFull (a ConnectionError; the channel stays open) when the socket's buffer has no
        room and nothing was written: the caller sends that message as a UCX frame instead. Any
        other failure, or a write that went out in part, closes the channel (ConnectionError)."""
        with self._write_lock:
            if self._fd is None:
                raise ConnectionError("the side channel closed")
            try:
                written = os.write(self._fd, data)  # non-blocking: the descriptor shares the socket's flags
            except BlockingIOError as e:
                # Nothing went out, so the framing is whole: the peer reads slowly (a burst of
                # grants with their ids), it has not stopped. A message under one socket buffer
                # segment (~32 KB: a grant's MAX_INLINE_IDS keeps under it) goes whole or not at all.
                raise ChannelFull(f"the side channel's buffer is full: {e}") from e
            except OSError as e:
                written, error = -1, f"{type(e).__name__}: {e}"
            else:
                error = f"a write took {written} of {len(data)} bytes (the peer stopped reading)"
            if written == len(data):
                return
            self._close_fd()
        log.warning("kv side channel dropped", reason=error)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.close)
        raise ConnectionError(f"the side channel closed: {error}")

    def close(self) -> None:
        """On the loop."""
        with self._write_lock:
            self._close_fd()
        if self._transport is not None:
            self._transport.close()

    def _close_fd(self) -> None:
        """Under the write lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---- asyncio.Protocol, on the loop
    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._fd = os.dup(transport.get_extra_info("socket").fileno())
        self.open = True

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._on_token is not None:
            if len(self._buffer) < TOKEN_BYTES:
                return
            token, self._buffer = bytes(self._buffer[:TOKEN_BYTES]), self._buffer[TOKEN_BYTES:]
            on_token, self._on_token = self._on_token, None
            on_token(self, token)
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > _MAX_BODY:
                return self._fault(f"a side-channel frame of {length} bytes")
            if len(self._buffer) < _LENGTH.size + length:
                return
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            try:
                message = decode_body(body)
            except ValueError as e:
                return self._fault(str(e))
            if not isinstance(message, self.allowed):
                return self._fault(f"a {message.kind} message on the side channel")
            if self._on_message is None:
                self._held.append(message)
            else:
                self._on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        with self._write_lock:
            self._close_fd()
        if self._on_lost is not None:
            self._on_lost(f"the side channel closed: {exc}" if exc else "the side channel closed")

    def _fault(self, reason: str) -> None:
        log.warning("kv side channel dropped", reason=reason)
        self.close()


class SideListener:
    """The receiving transport's socket, and the tokens of the connections it offered it to."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.name = f"\0pdmesh-kv-{uuid.uuid4().hex}"  # abstract: nothing on disk to clean up
        self._loop = loop
        self._server: asyncio.AbstractServer | None = None
        self._expected: dict[bytes, Callable[[SideChannel], None]] = {}
        self._arrived: dict[bytes, SideChannel] = {}

    async def start(self) -> bool:
        try:
            self._server = await self._loop.create_unix_server(
                lambda: SideChannel((AskWrite, Written), self._token), path=self.name
            )
        except OSError as e:
            log.info("kv side channel unavailable: direct writes' messages go over UCX", error=str(e))
            return False
        return True

    def offer(self) -> str:
        """A token for one connection's Welcome (hex)."""
        return secrets.token_hex(TOKEN_BYTES)

    def expect(self, token: str, bind: Callable[[SideChannel], None]) -> None:
        """Bind the socket that brings `token` (maybe already here) to its connection."""
        raw = bytes.fromhex(token)
        channel = self._arrived.pop(raw, None)
        if channel is not None:
            bind(channel)
        else:
            self._expected[raw] = bind
            self._loop.call_later(_BIND_S, self._expected.pop, raw, None)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for channel in self._arrived.values():
            channel.close()
        self._arrived.clear()
        self._expected.clear()

    def _token(self, channel: SideChannel, token: bytes) -> None:
        bind = self._expected.pop(token, None)
        if bind is not None:
            bind(channel)
            return
        self._arrived[token] = channel  # its connection's handshake is still finishing

        def unbound() -> None:
            if self._arrived.pop(token, None) is channel:
                channel.close()

        self._loop.call_later(_BIND_S, unbound)


async def dial_side(name: str, token: str, timeout_s: float) -> SideChannel | None:
    """The dialer's end of a side channel (Granted and Done come back on it), or None when it cannot be made."""
    loop = asyncio.get_running_loop()
    try:
        raw = bytes.fromhex(token)
        if len(raw) != TOKEN_BYTES:
            raise ValueError(f"a side-channel token of {len(raw)} bytes")
        _, channel = await asyncio.wait_for(
            loop.create_unix_connection(lambda: SideChannel((Granted, Done), None), path=name), timeout_s
        )
    except (OSError, TimeoutError, ValueError) as e:
        log.info("kv side channel not reached: direct writes' messages go over UCX", error=f"{type(e).__name__}: {e}")
        return None
    try:
        channel.send_raw(raw)
    except ConnectionError as e:
        log.info("kv side channel not reached: direct writes' messages go over UCX", error=str(e))
        channel.close()
        return None
    return channel


def close_quietly(channel: SideChannel | None) -> None:
    if channel is not None:
        with contextlib.suppress(Exception):
            channel.close()
