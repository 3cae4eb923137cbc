"""The sending side's direct writes, on the loop (KVSender's part; the push's is direct.py).

A push to a peer whose cache a connection mapped (ipc.py) asks to write its ticket at once; the Granted
brings the ticket's block ids (inline over the side channel, else as a small payload) and arms the
push; once its last copy has
finished, one Written reports every layer (with sampled checksums of the source blocks, gathered
on the copy stream before the engine may overwrite them). The engine thread hands the copies' end
event to the written thread, which waits for it off the GIL and sends the Written from there over
the connection's side channel (side.py), so the loop is not on that path at all; without a side
channel the loop sends it as a control frame. A ticket asked for that fails is answered
with Stopped once the copy stream has passed every copy of it; a lost connection's mapping is
dropped once no copy into it can still run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch

from engine.kv_layout import KVLayout
from kvtransfer.block_ids import PinnedIds, decode_ids
from kvtransfer.checksum import digest_rows
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Connection, Tasks, quietly
from kvtransfer.direct import DirectWrite, Finished
from kvtransfer.errors import TransferFailed
from kvtransfer.ipc import PeerCaches
from kvtransfer.push import KVPush
from kvtransfer.ticket import Ticket
from kvtransfer.timeline import Step, Timeline
from kvtransfer.wire import Granted, Stopped, Written

log = structlog.get_logger(__name__)

# A pack (or a copy) takes microseconds once the GPU reaches it; polling its event this long on the
# loop beats a thread hop when the GPU is not far behind the engine, and costs little when it is.
_PACK_POLL_S = 200e-6


@dataclass(slots=True, eq=False)
class Outgoing:
    """The loop's record of one push in flight."""

    push: KVPush
    lease_s: float = 0.0  # the receiver's lease: its longest allowed silence of ours
    deadline: asyncio.TimerHandle | None = None
    conn: Connection | None = None
    started: float | None = None
    bytes_sent: int = 0
    in_flight: int = 0  # messages handed over and not yet fully sent
    landed_bytes: int | None = None  # the receiver's Done; completes once in_flight is 0 too
    asked: bool = False  # an AskWrite went: if the ticket fails, the receiver waits for our Stopped


class DirectSending:
    """KVSender's direct-write half: the attributes and methods below the stubs are KVSender's."""

    config: TransportConfig
    layout: KVLayout | None
    timeline: Timeline
    copy_stream: torch.cuda.Stream | None
    _mapped: dict[str, PeerCaches]
    _outgoing: dict[str, Outgoing]
    _loop: asyncio.AbstractEventLoop
    _tasks: Tasks
    _waiter: concurrent.futures.ThreadPoolExecutor
    _written_thread: WrittenThread | None  # on GPU senders
    _grant_ids: PinnedIds  # a grant's block ids onto the copy stream (loop thread)

    def _fail(self, out: Outgoing, reason: str, *, tell_peer: bool, error: TransferFailed | None = None) -> None:
        raise NotImplementedError

    async def _bind(self, out: Outgoing) -> Connection:
        raise NotImplementedError

    def _renew(self, out: Outgoing) -> None:
        raise NotImplementedError

    def _complete(self, out: Outgoing) -> None:
        raise NotImplementedError

    def _direct_write(self, ticket: Ticket, layout: KVLayout) -> DirectWrite | None:
        """Direct writes for a push to a peer whose cache a live connection has mapped (the first
        push to a peer goes over UCX: its connection, and so the mapping, is made on the way)."""
        peer = self._mapped.get(ticket.address)
        if peer is None or self.copy_stream is None or layout != self.layout:
            return None
        lease_s = max(0.0, ticket.lease_left_s())
        return DirectWrite(
            peer, self.copy_stream, layout.num_layers, self.config.checksum_samples, lease_s, self.timeline,
            ticket.ticket_id,
        )  # fmt: skip

    async def _unmap(self, peer: PeerCaches) -> None:
        """Drop a lost connection's mapping once no copy into it can be queued or running."""
        if self.copy_stream is not None:
            await self._loop.run_in_executor(self._waiter, self.copy_stream.synchronize)
        peer.close()

    def _asks(self, out: Outgoing, conn: Connection) -> bool:
        direct = out.push.direct
        if direct is None:
            return False
        if conn.peer_caches is not direct.peer:  # the connection was made again since the push opened
            direct.decline()
            return False
        return True

    def _granted(self, out: Outgoing, conn: Connection, granted: Granted) -> None:
        """The ticket is ours to write: arm the push's direct writes with the block ids the Granted
        carries (over the side channel), or fetch them from the payload on its tag first (over UCX).

        A Failed of the ticket may reach this loop before its Granted (UCX frames and the side
        channel are not ordered with each other): the push has then failed, sent Stopped (it
        asked), and on_message drops the Granted as it drops any message of an ended push."""
        direct = out.push.direct
        self.timeline.mark(granted.ticket, Step.GRANTED)
        if direct is None or not granted.direct:
            if direct is not None:
                direct.decline()
            return
        if granted.tag:  # over UCX: the ids follow as a payload on this tag
            self._tasks.spawn(self._fetch_ids(out, conn, granted))
            return
        try:
            ids = decode_ids(granted.block_ids, out.push.ticket.num_blocks)
        except ValueError as e:
            self._fail(out, f"the grant's block ids: {e}", tell_peer=True)
            return
        self._arm(out, conn, ids)

    async def _fetch_ids(self, out: Outgoing, conn: Connection, granted: Granted) -> None:
        ids = torch.empty(out.push.ticket.num_blocks, dtype=torch.int64)
        try:
            await conn.recv_payload(ids, granted.tag)
        except Exception as e:
            self._fail(out, f"the grant's block ids were lost: {type(e).__name__}: {e}", tell_peer=True)
            return
        if self._outgoing.get(granted.ticket) is out:
            self._arm(out, conn, ids.numpy())

    def _arm(self, out: Outgoing, conn: Connection, ids: np.ndarray) -> None:
        """Queue the ids' upload on the copy stream (from a pinned buffer: the loop never waits for
        the stream) and copy what the push kept."""
        direct = out.push.direct
        assert direct is not None
        with torch.cuda.stream(direct.stream):
            dst_ids = self._grant_ids.upload(ids)
        direct.arm(dst_ids, conn.side if conn.side is not None and conn.side.open else None)
        self.timeline.mark(out.push.ticket.ticket_id, Step.ARMED)

    # ---- the written thread: where the end of a ticket's copies is first known
    def _await_written(self, push: KVPush, finished: Finished) -> None:
        """Wait for the ticket's copies (off the GIL), then send its Written from here over the side
        channel (sparing the hops to the loop and its task); the loop then only keeps the books.
        Without a side channel the loop sends it as a control frame."""
        info = push.ticket
        try:
            finished.written.synchronize()
            self.timeline.mark(info.ticket_id, Step.PACK_DONE, 0)
            checksums: tuple[tuple[int, int], ...] = ()
            if finished.samples is not None:
                checksums = digest_rows(finished.samples.cpu(), finished.chunks)
        except Exception as e:
            self._call_loop(self._written_failed, push, f"written failed: {type(e).__name__}: {e}")
            return
        written = Written(info.ticket_id, info.num_blocks * self.layout_bytes(push.layout), checksums)
        assert push.direct is not None
        if push.direct.send_written(written):
            self.timeline.mark(info.ticket_id, Step.HEADER_SENT, 0)
            self._call_loop(self._written_sent, push, written)
        else:
            self._call_loop(self._start_written_frame, push, written)

    def _call_loop(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the transport is shutting down
            self._loop.call_soon_threadsafe(callback, *args)

    # ---- the loop
    def _written_sent(self, push: KVPush, written: Written) -> None:
        out = self._outgoing.get(push.ticket.ticket_id)
        if out is None or out.push is not push:
            return  # the Done may already have completed it
        out.started = push.started_at if out.started is None else out.started
        out.bytes_sent = written.bytes
        self._renew(out)

    def _written_failed(self, push: KVPush, reason: str) -> None:
        out = self._outgoing.get(push.ticket.ticket_id)
        if out is not None and out.push is push:
            self._fail(out, reason, tell_peer=False)

    def _start_written_frame(self, push: KVPush, written: Written) -> None:
        out = self._outgoing.get(push.ticket.ticket_id)
        if out is None or out.push is not push:
            return
        out.started = push.started_at if out.started is None else out.started
        out.in_flight += 1
        self._tasks.spawn(self._send_written(out, written))

    async def _send_written(self, out: Outgoing, written: Written) -> None:
        """A Written as a control frame (a connection without a side channel)."""
        try:
            conn = await self._bind(out)
            if self._outgoing.get(written.ticket) is not out:
                return
            await conn.send_soon(written)
            self.timeline.mark(written.ticket, Step.HEADER_SENT, 0)
            out.bytes_sent = written.bytes
            if self._outgoing.get(written.ticket) is out:
                self._renew(out)
        except TransferFailed as e:
            self._fail(out, e.reason, tell_peer=False, error=e)
        except Exception as e:
            self._fail(out, f"written failed: {type(e).__name__}: {e}", tell_peer=False)
        finally:
            out.in_flight -= 1
        if out.landed_bytes is not None and out.in_flight == 0 and self._outgoing.get(written.ticket) is out:
            self._complete(out)

    @staticmethod
    def layout_bytes(layout: KVLayout) -> int:
        """Bytes of one block over every layer, K and V."""
        return layout.num_layers * layout.block_elems_per_layer * getattr(torch, layout.dtype).itemsize

    async def _stopped(self, out: Outgoing, stopped: torch.cuda.Event | None) -> None:
        """Tell the receiver of a failed ticket it asked for once none of its copies can still run."""
        if stopped is not None:
            await self._loop.run_in_executor(self._waiter, stopped.synchronize)
        conn = out.conn
        if conn is not None and conn.lost is None:
            await quietly(conn.send(Stopped(out.push.ticket.ticket_id)))


class WrittenThread:
    """The written thread: runs the calls handed to it, in order. A SimpleQueue hand-over costs the
    engine thread ~1 µs where an executor's submit (a future and a work item) costs ~10. A call is
    either refused (RuntimeError: the caller fails its ticket) or run, even while the thread shuts
    down: the check and the hand-over are one step under a lock, so none lands behind the end."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvtransfer-written", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the written thread has shut down")
            self._queue.put((call, args))

    def shutdown(self) -> None:
        """Run what was handed over, then stop."""
        with self._lock:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            call, args = item
            try:
                call(*args)
            except Exception:
                log.exception("kv written thread: a call failed")


async def finishes_soon(event: torch.cuda.Event) -> bool:
    """Whether event completes within _PACK_POLL_S, queried between the loop's other callbacks."""
    deadline = time.monotonic() + _PACK_POLL_S
    while not event.query():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0)
    return True
