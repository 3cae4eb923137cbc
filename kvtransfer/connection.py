"""One handshaken UCX endpoint to a peer worker, and the tasks that run on the transport's loop.

A Connection reads control frames in a loop and hands each to its owner; it reports its loss
once (peer died, endpoint error, malformed frame, or we aborted it). Payloads are sent and
received on per-message tags chosen by the sender. Everything here runs on the transport's
event loop, except the UCX close callback, which only schedules work onto it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
import structlog
import torch
from ucxx.exceptions import UCXMessageTruncatedError

from engine.kv_layout import KVLayout
from kvtransfer.ipc import CacheExport, PeerCaches
from kvtransfer.side import SideChannel, close_quietly
from kvtransfer.wire import FRAME_BYTES, Message, decode, encode

log = structlog.get_logger(__name__)

CTL_TAG = 1  # control frames; payload tags start above it
_FIRST_PAYLOAD_TAG = 2


def ucx_buffer(data: torch.Tensor) -> Any:
    """What ucxx can read or write in place: numpy for host memory, the tensor itself on CUDA."""
    return data if data.is_cuda else data.numpy()


def notify(callback: Callable[..., None], *args: Any) -> None:
    """Call an observer hook; a hook that raises is logged, never allowed to break a transfer."""
    try:
        callback(*args)
    except Exception:
        log.exception("kvtransfer observer raised")


async def quietly(aw: Awaitable[None]) -> None:
    """Await a best-effort control send (Cancel, Failed, Done) whose loss changes nothing here."""
    try:
        await aw
    except Exception as e:
        log.debug("kvtransfer control send failed", error=str(e))


class Tasks:
    """The loop's background tasks, kept referenced until done and cancelled together at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("kvtransfer task failed", exc_info=task.exception())

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _ignore_message(conn: Connection, message: Message) -> None:
    pass


def _ignore_loss(conn: Connection, reason: str) -> None:
    pass


class Connection:
    def __init__(
        self,
        ep: Any,  # ucxx Endpoint
        peer: str,  # the peer's listener address, "host:port"
        instance: str,  # the peer process's random id
        layout: KVLayout,  # what the handshake agreed on: every block on this connection has it
        on_message: Callable[[Connection, Message], None],
        on_lost: Callable[[Connection, str], None],
    ) -> None:
        self.ep = ep
        self.peer = peer
        self.instance = instance
        self.layout = layout
        self.lost: str | None = None  # why the connection ended, once it has
        # Direct writes (ipc.py): on the dialing side, the peer's caches mapped into this process;
        # on the accepting side, our caches' export the handshake offered it (closed when it is lost).
        self.peer_caches: PeerCaches | None = None
        self.export: CacheExport | None = None
        self.side: SideChannel | None = None  # a direct write's messages go here when set (side.py)
        self._on_message = on_message
        self._on_lost = on_lost
        self._next_tag = _FIRST_PAYLOAD_TAG
        self._reader: asyncio.Task[None] | None = None

    def start(self, tasks: Tasks) -> None:
        loop = asyncio.get_running_loop()

        def closed_by_ucx() -> None:  # runs on UCX's progress thread
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop closed, we are shutting down
                loop.call_soon_threadsafe(self._lose, "endpoint closed by UCX (peer gone)")

        self.ep.set_close_callback(closed_by_ucx)
        self._reader = tasks.spawn(self._read())

    @property
    def export_offered(self) -> bool:
        """Accepting side: whether the handshake offered this peer our caches to write directly."""
        return self.export is not None

    def next_tag(self) -> int:
        tag = self._next_tag
        self._next_tag += 1
        return tag

    async def send(self, message: Message) -> None:
        await self.ep.send(encode(message), tag=CTL_TAG)

    async def send_soon(self, message: Message) -> None:
        """An AskWrite, or a Written without the written thread (kvtransfer/direct_send.py): over the
        side channel while it is open (same host), else as a control frame."""
        if not self.send_now(message):
            await self.send(message)

    def send_now(self, message: Message) -> bool:
        """AskWrite, Granted, Written or Done over the side channel, written before this returns;
        False (nothing sent) when the connection has none open."""
        side = self.side
        if side is None or not side.open:
            return False
        try:
            side.send(message)
        except ConnectionError:
            return False  # its buffer is full (it stays up), or it just went: its loss takes this connection down
        return True

    def attach_side(self, channel: SideChannel) -> None:
        """Take a direct write's messages over `channel` from now on; its loss is this connection's."""
        if self.lost is not None:
            channel.close()
            return
        self.side = channel
        channel.bind(lambda message: notify(self._on_message, self, message), self._lose)

    async def send_payload(self, data: torch.Tensor, tag: int) -> None:
        await self.ep.send(ucx_buffer(data), tag=tag)

    async def recv_payload(self, data: torch.Tensor, tag: int) -> None:
        """Receive into data; UCXMessageTruncatedError if the payload is larger than data."""
        await self.ep.recv(ucx_buffer(data), tag=tag)

    async def discard_payload(self, tag: int) -> None:
        """Consume a refused payload without keeping it: a 1-byte receive that UCX truncates."""
        with contextlib.suppress(UCXMessageTruncatedError):
            await self.ep.recv(np.empty(1, np.uint8), tag=tag)

    def abort(self, reason: str) -> None:
        self._lose(reason)

    async def _read(self) -> None:
        try:
            while True:
                frame = bytearray(FRAME_BYTES)
                await self.ep.recv(frame, tag=CTL_TAG)
                message = decode(frame)
                # A handler's bug concerns one ticket: it must not take down every ticket on the
                # connection.
                notify(self._on_message, self, message)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # endpoint error, peer death, malformed frame
            self._lose(f"{type(e).__name__}: {e}")

    def _lose(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self.ep.abort()  # fails every request still pending on the endpoint
        close_quietly(self.side)
        on_lost = self._on_lost
        # A lost connection routes nothing more, and must not keep its owner alive: its cancelled
        # reader task, whose cancellation's traceback holds the reader's frame (and so this
        # connection), is held from outside Python's GC (ucxx 0.52, CPython 3.11: no gc referrer),
        # which kept the closed transport and its caches alive into interpreter shutdown.
        self._on_message, self._on_lost = _ignore_message, _ignore_loss
        on_lost(self, reason)
