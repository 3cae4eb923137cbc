"""The sending side's loop half: send a ticket's packed messages, keep its lease, hear the outcome.

KVPush (push.py) is what the prefill engine holds; it packs each message's layers on the
engine's thread and hands the message to the loop.

KVSender, on the loop, sends a Data header at once (the receiver checks it and posts its receive
while the pack runs), then the payload once the pack has finished, and resolves the push's future
when the receiver reports every layer landed (or fails it). A pack that has already finished when
the loop gets to it (the usual case: a pack takes microseconds) is sent without a thread hop. From
the moment a push opens (the prefill request has arrived, maybe to wait in the engine's queue)
until its first message goes, it sends the receiver a Hold every quarter lease (the first a few
milliseconds after opening), which keeps the ticket's lease from running out while the prefill
has not even begun. The sender's own deadline
likewise counts from the last Hold or message it sent.

A push to a peer whose cache this process mapped at the handshake (ipc.py) asks to write its ticket at
once instead of the first Hold; the receiver's Granted brings the ticket's block ids (inline, or a
small payload), which arms the push's direct writes (direct.py); once the last copy has finished,
one Written message reports every layer (sent by the thread that saw the copies finish:
direct_send.py), and the Done completes the push as before (AskWrite, Granted, Written and Done
over the connection's same-host side channel when it has one: side.py). A ticket asked for
that fails is answered with Stopped once the copy stream has passed every copy of it: only then
may the receiver free its blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog
import torch

from engine.kv_layout import KVLayout
from kvtransfer.block_ids import PinnedIds
from kvtransfer.checksum import digest_chunks, sample_chunks
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Connection, Tasks, notify, quietly
from kvtransfer.direct import Finished
from kvtransfer.direct_send import DirectSending, Outgoing, WrittenThread, finishes_soon
from kvtransfer.errors import IncompatiblePeer, TransferFailed
from kvtransfer.ipc import PeerCaches
from kvtransfer.push import KVPush, Outbound
from kvtransfer.staging import StagingPool
from kvtransfer.telemetry import Direction, TransferObserver, TransferStats
from kvtransfer.ticket import Ticket
from kvtransfer.timeline import Step, Timeline
from kvtransfer.wire import AskWrite, Cancel, Data, Done, Failed, Granted, Hold, Message

log = structlog.get_logger(__name__)

_FIRST_HOLD_S = 0.005  # see KVSender._hold


class KVSender(DirectSending):
    """The loop side of every push. Messages of a ticket, and tickets, are sent concurrently."""

    def __init__(
        self,
        layout: KVLayout | None,  # of the blocks pushed unless open() names another; None: always named
        config: TransportConfig,
        observer: TransferObserver,
        loop: asyncio.AbstractEventLoop,
        tasks: Tasks,
        connect: Callable[[str, KVLayout], Awaitable[Connection]],
        timeline: Timeline,
    ) -> None:
        self.layout = layout
        self.config = config
        self.timeline = timeline
        self.pool = StagingPool(torch.device(config.device), config.staging_retain_bytes)
        self._observer = observer
        self._loop = loop
        self._tasks = tasks
        self._connect = connect
        self._outgoing: dict[str, Outgoing] = {}  # loop thread only
        self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtransfer-pack-wait")
        device = torch.device(config.device)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # the waiter thread's
        # direct writes: their copies run on this stream; the caches mapped per peer address (loop writes)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._mapped: dict[str, PeerCaches] = {}
        # waits for a direct-write ticket's copies and sends its Written (direct_send.py): a thread
        # of its own, so a Written never queues behind a pack's or an unmap's wait
        self._written_thread = WrittenThread() if self.copy_stream is not None else None
        self._grant_ids = PinnedIds(device)  # grants' block ids onto the copy stream (loop thread)
        self._source_ids: dict[torch.device, PinnedIds] = {}  # pushes' block ids, per cache device

    # ---- any thread
    def __len__(self) -> int:
        return len(self._outgoing)

    def source_ids(self, device: torch.device) -> PinnedIds:
        """Where a push's source block ids go up to `device` (the engine thread)."""
        ids = self._source_ids.get(device)
        return ids if ids is not None else self._source_ids.setdefault(device, PinnedIds(device))

    def uses(self, conn: Connection) -> bool:
        """Whether a ticket is being pushed over `conn` (loop thread)."""
        return any(out.conn is conn for out in self._outgoing.values())

    def open(self, ticket: Ticket, layout: KVLayout | None = None) -> KVPush:
        layout = layout or self.layout
        if layout is None:
            raise ValueError("this transport serves several KV layouts: name the layout of the blocks pushed")
        push = KVPush(self, ticket, layout, self._direct_write(ticket, layout))
        self.timeline.mark(ticket.ticket_id, Step.OPENED)
        self._loop.call_soon_threadsafe(self._register, push)
        return push

    def submit(self, push: KVPush, message: Outbound) -> None:
        self._loop.call_soon_threadsafe(self._start_send, push, message)

    def submit_written(self, push: KVPush, finished: Finished) -> None:
        assert self._written_thread is not None  # a Finished comes only from a GPU push's copies
        try:
            self._written_thread.submit(self._await_written, push, finished)
        except RuntimeError:  # the transport is closing: no Written will go, so the push fails (the
            # receiver hears Cancel while its connection lasts) rather than wait out its lease
            with contextlib.suppress(RuntimeError):  # the loop closed too: its end failed every push
                self.stop(push, "the transport closed before the ticket's Written went")

    def stop(self, push: KVPush, reason: str) -> None:
        self._loop.call_soon_threadsafe(self._stop, push, reason)

    # ---- loop thread
    def on_message(self, conn: Connection, message: Message) -> None:
        out = self._outgoing.get(getattr(message, "ticket", ""))
        if out is None or out.conn is not conn:
            return  # a late reply for a ticket that already ended here
        if isinstance(message, Done):
            self.timeline.mark(out.push.ticket.ticket_id, Step.DONE_HEARD)
            out.landed_bytes = message.bytes
            if out.in_flight == 0:  # else the last send's completion, just behind, completes it
                self._complete(out)
        elif isinstance(message, Failed):
            self._fail(out, f"the receiver ended it: {message.reason}", tell_peer=False)
        elif isinstance(message, Granted):
            self._granted(out, conn, message)

    def on_lost(self, conn: Connection, reason: str) -> None:
        for out in [o for o in self._outgoing.values() if o.conn is conn]:
            self._fail(out, f"connection lost: {reason}", tell_peer=False)
        if conn.peer_caches is not None:
            if self._mapped.get(conn.peer) is conn.peer_caches:
                del self._mapped[conn.peer]
            self._tasks.spawn(self._unmap(conn.peer_caches))

    def shutdown(self) -> None:
        for out in list(self._outgoing.values()):
            self._fail(out, "the transport closed", tell_peer=False)
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy runs into a mapping the teardown drops
        self._waiter.shutdown(wait=True)
        if self._written_thread is not None:
            self._written_thread.shutdown()

    def _register(self, push: KVPush) -> None:
        ticket = push.ticket.ticket_id
        if ticket in self._outgoing:
            failure = TransferFailed(push.ticket.address, ticket, 0, "this ticket is already being pushed")
            push.future.set_exception(failure)
            return
        out = Outgoing(push, lease_s=max(0.0, push.ticket.lease_left_s()))
        self._outgoing[ticket] = out
        self._renew(out)
        self._tasks.spawn(self._hold(out))

    def _renew(self, out: Outgoing) -> None:
        """Restart our deadline: the receiver's lease from now, plus a grace to hear its verdict."""
        if out.deadline is not None:
            out.deadline.cancel()
        out.deadline = self._loop.call_later(out.lease_s + self.config.sender_grace_s, self._expire, out)

    async def _hold(self, out: Outgoing) -> None:
        """Hold the ticket until the first message goes (then every message renews the lease).

        The connection is made at once (dialing takes milliseconds), the first Hold only after
        _FIRST_HOLD_S: a push whose first message goes sooner needs none (its Data header binds the
        ticket and renews the lease), which spares a quick ticket a control message and the work
        its completions cost both loops while the engine packs."""
        interval = max(out.lease_s / 4, 0.05)
        ticket = out.push.ticket.ticket_id
        first = True
        while self._outgoing.get(ticket) is out and out.started is None:
            try:
                conn = await self._bind(out)
                sent_at = time.monotonic()
                if first and self._asks(out, conn):  # at once: the grant must come before the last layer
                    first, out.asked = False, True
                    await conn.send_soon(AskWrite(ticket))  # over the side channel when there is one
                    self.timeline.mark(ticket, Step.ASK_SENT)
                elif first:
                    first = False
                    await asyncio.sleep(min(_FIRST_HOLD_S, out.lease_s / 4))
                    continue
                else:
                    await conn.send(Hold(ticket))
                if out.push.direct is not None:
                    out.push.direct.renewed(sent_at + out.lease_s)
            except TransferFailed as e:
                self._fail(out, e.reason, tell_peer=False, error=e)
                return
            except Exception as e:  # UCX errors: the connection's loss handler usually got there first
                self._fail(out, f"hold failed: {type(e).__name__}: {e}", tell_peer=False)
                return
            self._renew(out)
            await asyncio.sleep(interval)

    def _start_send(self, push: KVPush, message: Outbound) -> None:
        out = self._outgoing.get(push.ticket.ticket_id)
        if out is None or out.push is not push:
            self.pool.release(message.staging)
            return
        out.started = message.pushed_at if out.started is None else out.started
        out.in_flight += 1
        self._tasks.spawn(self._send(out, message))

    async def _send(self, out: Outgoing, message: Outbound) -> None:
        ticket_id = out.push.ticket.ticket_id
        self.timeline.mark(ticket_id, Step.SEND_TASK, message.first_layer)
        try:
            conn = await self._bind(out)
            tag = conn.next_tag()
            checksums: tuple[tuple[int, int], ...] = ()
            if self.config.checksum_samples:  # the header carries hashes of the packed payload: it waits
                checksums = await self._hashes(out, message)
            if self._outgoing.get(out.push.ticket.ticket_id) is not out:
                return
            # The header goes at once, so the receiver checks it and posts its receive while the pack
            # runs; the payload follows once packed, even if the push ends meanwhile (the receiver
            # is waiting for it). Both finish before the staging buffer goes back to the pool.
            header = self._header(out, message, tag, checksums)
            header_sent = asyncio.ensure_future(self._send_header(conn, header))
            sent = await asyncio.gather(
                self._send_packed(conn, message, tag, ticket_id), header_sent, return_exceptions=True
            )
            for result in sent:
                if isinstance(result, BaseException):
                    raise result
            out.bytes_sent += message.staging.nbytes
            if self._outgoing.get(out.push.ticket.ticket_id) is out:
                self._renew(out)
        except TransferFailed as e:
            self._fail(out, e.reason, tell_peer=False, error=e)
        except Exception as e:  # UCX errors: the connection's loss handler usually got there first
            self._fail(out, f"send failed: {type(e).__name__}: {e}", tell_peer=False)
        finally:
            out.in_flight -= 1
            self.pool.release(message.staging)
        if out.landed_bytes is not None and out.in_flight == 0 and self._outgoing.get(out.push.ticket.ticket_id) is out:
            self._complete(out)  # every staging buffer of the ticket is back in the pool first

    async def _send_header(self, conn: Connection, header: Data) -> None:
        await conn.send(header)
        self.timeline.mark(header.ticket, Step.HEADER_SENT, header.first_layer)

    async def _send_packed(self, conn: Connection, message: Outbound, tag: int, ticket_id: str) -> None:
        """Send the payload once its pack has finished: as soon as the loop sees it has, if that is
        within _PACK_POLL_S (a finished event is a query away; the loop runs its other work between
        queries), else after a wait on the waiter thread (a hop to it and back costs ~0.2 ms)."""
        if message.packed is not None and not await finishes_soon(message.packed):
            await self._loop.run_in_executor(self._waiter, message.packed.synchronize)
        self.timeline.mark(ticket_id, Step.PACK_DONE, message.first_layer)
        await conn.send_payload(message.staging.data, tag)
        self.timeline.mark(ticket_id, Step.PAYLOAD_SENT, message.first_layer)

    async def _bind(self, out: Outgoing) -> Connection:
        """The ticket's connection: every message of a ticket goes over the same one."""
        info = out.push.ticket
        try:
            conn = await self._connect(info.address, out.push.layout)
        except IncompatiblePeer as e:
            raise IncompatiblePeer(info.address, info.ticket_id, e.difference) from None
        except Exception as e:
            raise TransferFailed(info.address, info.ticket_id, 0, f"cannot connect: {type(e).__name__}: {e}") from e
        if out.conn is None:
            out.conn = conn
            self.timeline.mark(info.ticket_id, Step.CONNECTED)
            if conn.peer_caches is not None:
                self._mapped[info.address] = conn.peer_caches
        if conn is not out.conn or conn.lost is not None:
            raise TransferFailed(info.address, info.ticket_id, out.bytes_sent, "connection lost mid-ticket")
        return conn

    async def _hashes(self, out: Outgoing, message: Outbound) -> tuple[tuple[int, int], ...]:
        if message.packed is None:
            return self._checksums(out, message)
        return await self._loop.run_in_executor(self._waiter, self._packed_checksums, out, message)

    def _packed_checksums(self, out: Outgoing, message: Outbound) -> tuple[tuple[int, int], ...]:
        """On the waiter thread: wait for the pack, then hash on the sender's own stream — a read-back
        on the default stream would wait for every step the engine has queued since the pack."""
        assert message.packed is not None
        message.packed.synchronize()
        if self._stream is None:
            return self._checksums(out, message)
        with torch.cuda.stream(self._stream):
            return self._checksums(out, message)

    def _checksums(self, out: Outgoing, message: Outbound) -> tuple[tuple[int, int], ...]:
        info = out.push.ticket
        if not self.config.checksum_samples:
            return ()
        chunk_bytes = message.staging.nbytes // (message.num_layers * 2 * info.num_blocks)
        key = f"{info.ticket_id}:{message.first_layer}"
        chunks = sample_chunks(message.num_layers * 2 * info.num_blocks, self.config.checksum_samples, key)
        return digest_chunks(message.staging.data, chunk_bytes, chunks)

    def _header(self, out: Outgoing, message: Outbound, tag: int, checksums: tuple[tuple[int, int], ...]) -> Data:
        info = out.push.ticket
        return Data(
            info.ticket_id, message.first_layer, message.num_layers, info.num_blocks, message.staging.nbytes, tag,
            checksums,
        )  # fmt: skip

    def _stop(self, push: KVPush, reason: str) -> None:
        out = self._outgoing.get(push.ticket.ticket_id)
        if out is not None and out.push is push:
            self._fail(out, reason, tell_peer=True)

    def _expire(self, out: Outgoing) -> None:
        stalled = out.in_flight > 0 and out.conn is not None
        self._fail(out, f"the lease expired with {out.bytes_sent} bytes sent", tell_peer=True)
        if stalled and out.conn is not None:  # sends the receiver never took: the peer is stuck
            out.conn.abort("a ticket's sends stalled past its lease")

    def _complete(self, out: Outgoing) -> None:
        self._forget(out)
        self.timeline.mark(out.push.ticket.ticket_id, Step.COMPLETED)
        nbytes = out.landed_bytes or 0
        started = out.started if out.started is not None else (out.push.started_at or time.monotonic())
        info = out.push.ticket
        stats = TransferStats(info.ticket_id, info.address, Direction.SEND, nbytes, time.monotonic() - started)
        _settle(out.push.future, stats)
        notify(self._observer.on_complete, stats)

    def _fail(self, out: Outgoing, reason: str, *, tell_peer: bool, error: TransferFailed | None = None) -> None:
        if self._outgoing.get(out.push.ticket.ticket_id) is not out:
            return
        self._forget(out)
        info = out.push.ticket
        error = error or TransferFailed(info.address, info.ticket_id, out.bytes_sent, reason)
        # A push this side cancelled (its blocks left the prefix cache, its request ended) is an
        # outcome its caller chose, not a fault: info, not a warning.
        report = log.info if reason.startswith("cancelled: ") else log.warning
        report("kv push failed", ticket=info.ticket_id, peer=info.address, reason=error.reason)
        if tell_peer and out.conn is not None and out.conn.lost is None:
            self._tasks.spawn(quietly(out.conn.send(Cancel(info.ticket_id, reason))))
        elif tell_peer and out.conn is None:  # ended while dialing: the receiver still holds the blocks
            self._tasks.spawn(quietly(self._cancel_once_connected(info, out.push.layout, reason)))
        if out.push.direct is not None:
            stopped = out.push.direct.stop()  # launches nothing more from here on
            if out.asked:
                self._tasks.spawn(self._stopped(out, stopped))
        _settle(out.push.future, error)
        notify(self._observer.on_failure, error, Direction.SEND)

    async def _cancel_once_connected(self, info: Ticket, layout: KVLayout, reason: str) -> None:
        """Tell the receiver of a ticket that ended before its connection was up, so it frees the
        blocks now rather than when its lease runs out (a connection that cannot be made: the lease)."""
        conn = await self._connect(info.address, layout)
        await conn.send(Cancel(info.ticket_id, reason))

    def _forget(self, out: Outgoing) -> None:
        del self._outgoing[out.push.ticket.ticket_id]
        if out.deadline is not None:
            out.deadline.cancel()


def _settle(future: concurrent.futures.Future[TransferStats], outcome: TransferStats | TransferFailed) -> None:
    """Resolve a push's future unless its awaiter cancelled it (the prefill was cancelled: an
    awaited asyncio.wrap_future cancels the future it wraps). Raising here would run up into the
    connection's reader and take the connection down, failing every other ticket on it."""
    try:
        if isinstance(outcome, TransferFailed):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled: nobody waits for this outcome
