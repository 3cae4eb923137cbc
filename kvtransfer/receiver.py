"""The receiving side: expect a ticket into reserved blocks, scatter arrivals, report the outcome.

TicketImport (ticket_import.py) is what the decode engine holds (engine.handoff.KVImport).
KVReceiver, on the transport's loop, checks every Data header against its ticket (known, from the
bound peer, layers in range and not seen, exact byte size) before receiving its payload into a
pooled staging buffer, then unpacks it into exactly the ticket's blocks (unpack.py: on the
receiver's own CUDA stream, never the engine's). A ticket lands in the receiver's own caches (a
worker's engine) unless expect() names others (KVCaches: a KV store keeps one set per KV layout
it holds); a Data header is accepted only over a connection whose handshake agreed on that
ticket's layout. A ticket that fails (lease, peer lost, cancel, bad message) publishes its error
only after any unpack in progress has finished: once error() is set, or cancel() has returned, the
transport never writes those blocks again, so the engine may free them.

The receiver owns the ticket's lease, the only clock of a hold. It measures the sender's
silence: it starts at expect() and starts over at every Hold the sender sends while the prefill
waits or computes, and at every Data header accepted, so a busy prefill worker keeps its tickets
and a dead or idle one loses them one lease after its last word. A Hold also binds the ticket to
its sender's connection, so losing that connection fails the ticket at once. A lease that runs out
fails a transfer still in flight and then, unless the ticket was committed (the decode engine took
the blocks over) or cancelled, calls the owner's on_expire once nothing writes the blocks any
more, so the owner frees them. A committed ticket's transfer must still land within a lease of
its sender's last word; if it does not, it fails and the engine frees the blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import structlog
import torch

from kernels.kv_pack import validate_block_ids
from kvtransfer.caches import KVCaches
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Connection, Tasks, notify, quietly
from kvtransfer.direct_receive import DirectReceiving
from kvtransfer.errors import TransferFailed
from kvtransfer.incoming import Incoming, check_data
from kvtransfer.staging import StagingPool
from kvtransfer.telemetry import Direction, TransferObserver, TransferStats
from kvtransfer.ticket import Ticket, TicketId
from kvtransfer.ticket_import import CALL_TIMEOUT_S, LeaseState, TicketImport, on_loop
from kvtransfer.timeline import Step, Timeline
from kvtransfer.unpack import Unpacker
from kvtransfer.wire import AskWrite, Cancel, Data, Done, Failed, Hold, Message, Stopped, Written

# KVCaches, LeaseState and TicketImport lived here before their own modules: still importable from here
__all__ = ["KVCaches", "KVReceiver", "LeaseState", "TicketImport", "check_data"]

log = structlog.get_logger(__name__)

_REMEMBERED_ENDINGS = 1024  # why recent tickets ended, to answer late messages precisely
_COMPLETED = "the ticket already completed"
_SENDER_CANCELLED = "the sender ended it: cancelled: "  # its push was cancelled on purpose (KVPush.cancel)


class KVReceiver(DirectReceiving):
    def __init__(
        self,
        caches: KVCaches | None,  # where tickets land unless expect() names other caches
        config: TransportConfig,
        observer: TransferObserver,
        loop: asyncio.AbstractEventLoop,
        tasks: Tasks,
        address: str,
        timeline: Timeline,
    ) -> None:
        if caches is not None:
            caches.check()
        self.caches = caches
        device = caches.tensors[0].device if caches is not None else torch.device(config.device)
        self.pool = StagingPool(device, config.staging_retain_bytes)
        self._observer = observer
        self.loop = loop
        self._tasks = tasks
        self._address = address
        self.timeline = timeline
        self._incoming: dict[str, Incoming] = {}  # loop thread only
        self._leases: dict[TicketImport, asyncio.TimerHandle] = {}  # loop thread only
        self._endings: OrderedDict[str, str] = OrderedDict()
        self._slots = asyncio.Semaphore(config.max_inflight_recv)
        self._unpacker = Unpacker(loop, config.one_torch_thread)
        self._grace_s = config.sender_grace_s
        self._quarantined: dict[str, Incoming] = {}  # failed tickets a direct writer has not yet let go

    # ---- any thread but the loop's
    def __len__(self) -> int:
        return len(self._incoming)

    def expect(
        self,
        ticket_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float,
        on_expire: Callable[[TicketImport], None] | None = None,
        caches: KVCaches | None = None,
    ) -> TicketImport:
        """Register a ticket whose layers will land in block_ids (of `caches`, else the receiver's
        own), leased for timeout_s; ValueError for a bad request. on_expire runs on the transport's
        thread if the lease runs out uncommitted."""
        ticket, registered = self._submit(ticket_id, block_ids, num_tokens, timeout_s, on_expire, caches)
        registered.result(CALL_TIMEOUT_S)
        return ticket

    async def expect_async(
        self,
        ticket_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float,
        on_expire: Callable[[TicketImport], None] | None = None,
        caches: KVCaches | None = None,
    ) -> TicketImport:
        """expect() for a caller on another event loop (a gRPC servicer)."""
        ticket, registered = self._submit(ticket_id, block_ids, num_tokens, timeout_s, on_expire, caches)
        await asyncio.wait_for(asyncio.wrap_future(registered), CALL_TIMEOUT_S)
        return ticket

    def cancel(self, ticket: TicketImport, reason: str) -> concurrent.futures.Future[None] | None:
        """End the ticket's lease and fail it; the future resolves once nothing writes its blocks."""
        ticket._end_lease(LeaseState.ENDED)
        if self.loop.is_closed():
            return None
        return asyncio.run_coroutine_threadsafe(self._cancel(ticket, reason), self.loop)

    # ---- loop thread
    def on_message(self, conn: Connection, message: Message) -> None:
        if isinstance(message, Hold):
            self._hold(conn, message.ticket)
        elif isinstance(message, Data):
            self.timeline.mark(message.ticket, Step.DATA_HEARD, message.first_layer)
            self._tasks.spawn(self._receive(conn, message))
        elif isinstance(message, Cancel):
            entry = self._incoming.get(message.ticket)
            if entry is not None and entry.conn in (None, conn):
                self._fail(entry, f"the sender ended it: {message.reason}", tell_peer=False)
        elif isinstance(message, AskWrite):
            self._ask(conn, message.ticket)
        elif isinstance(message, Written):
            self.timeline.mark(message.ticket, Step.WRITTEN_HEARD)
            self._written(conn, message)
        elif isinstance(message, Stopped):
            entry = self._quarantined.get(message.ticket)
            if entry is not None and entry.conn is conn:
                self._release(entry)

    def on_lost(self, conn: Connection, reason: str) -> None:
        for entry in [e for e in self._incoming.values() if e.conn is conn]:
            self._fail(entry, f"connection lost: {reason}", tell_peer=False)
        for entry in [e for e in self._quarantined.values() if e.conn is conn]:
            # The writer stops launching copies when it sees the loss; what it queued before ends
            # within milliseconds. Its Stopped can no longer come: free the blocks a grace later.
            self.loop.call_later(self._grace_s, self._release, entry)

    def shutdown(self) -> None:
        for lease in self._leases.values():
            lease.cancel()
        self._leases.clear()
        for entry in list(self._incoming.values()):
            self._fail(entry, "the transport closed", tell_peer=False)
        self._unpacker.shutdown()
        for entry in list(self._quarantined.values()):
            self._release(entry)
        for entry in list(self._incoming.values()):
            self._publish(entry)

    def _submit(
        self,
        ticket_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float,
        on_expire: Callable[[TicketImport], None] | None,
        caches: KVCaches | None,
    ) -> tuple[TicketImport, concurrent.futures.Future[None]]:
        if on_loop(self.loop):
            raise RuntimeError("expect() blocks: call it from the engine or a service thread, not the transport's")
        if caches is None:
            if self.caches is None:
                raise ValueError("this receiver has no caches of its own: name the caches the ticket lands in")
            caches = self.caches
        elif caches is not self.caches:
            caches.check()
        layout = caches.layout
        want_blocks = -(-num_tokens // layout.block_size)
        if num_tokens < 1 or len(block_ids) != want_blocks:
            raise ValueError(
                f"{num_tokens} tokens need {want_blocks} blocks of {layout.block_size}, got {len(block_ids)}"
            )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s is {timeout_s}; give the transfer a positive lease")
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        validate_block_ids(ids, caches.num_blocks)
        if caches.tensors[0].is_cuda:
            ids = ids.pin_memory()  # copied to the device by _register, off the unpack's path
        expiry_ms = int((time.time() + timeout_s) * 1000)
        ticket = Ticket(TicketId(ticket_id), self._address, num_tokens, len(block_ids), expiry_ms)
        imported = TicketImport(self, ticket, layout.num_layers, on_expire)
        registered = self._register(imported, caches, ids, timeout_s)
        return imported, asyncio.run_coroutine_threadsafe(registered, self.loop)

    async def _register(self, ticket: TicketImport, caches: KVCaches, ids: torch.Tensor, timeout_s: float) -> None:
        ticket_id = ticket.ticket_id
        if ticket_id in self._incoming:
            raise ValueError(f"ticket {ticket_id!r} is already expected")
        self._endings.pop(ticket_id, None)
        layout = caches.layout
        layer_bytes = ids.numel() * layout.block_elems_per_layer * caches.tensors[0].dtype.itemsize
        device_ids = self._unpacker.upload(ids, caches.tensors[0].device)
        entry = Incoming(ticket, caches, ids, device_ids, layer_bytes, timeout_s, [False] * layout.num_layers)
        self._incoming[ticket_id] = entry
        self._start_lease(ticket, timeout_s)
        self.timeline.mark(ticket_id, Step.EXPECTED)

    def _start_lease(self, ticket: TicketImport, lease_s: float) -> None:
        """(Re)start the ticket's lease: lease_s from now."""
        old = self._leases.pop(ticket, None)
        if old is not None:
            old.cancel()
        self._leases[ticket] = self.loop.call_later(lease_s, lambda: self._tasks.spawn(self._expire(ticket)))

    def _hold(self, conn: Connection, ticket_id: str) -> None:
        """The sender still has the ticket's prefill: bind it to that sender and start the lease over."""
        self.timeline.mark(ticket_id, Step.HOLD_HEARD)
        entry = self._incoming.get(ticket_id)
        if entry is None:
            ending = self._endings.get(ticket_id, "unknown ticket (never expected here)")
            if ending != _COMPLETED:  # released, expired or cancelled: the sender can stop now
                self._tasks.spawn(quietly(conn.send(Failed(ticket_id, ending))))
            return
        if entry.conn is not None and entry.conn is not conn:
            return  # another sender's word does not keep this ticket
        entry.conn, entry.ticket.sender = conn, conn.peer
        if entry.ticket in self._leases:
            self._start_lease(entry.ticket, entry.lease_s)

    async def _cancel(self, ticket: TicketImport, reason: str) -> None:
        lease = self._leases.pop(ticket, None)
        if lease is not None:
            lease.cancel()
        await self._stop_transfer(ticket, f"cancelled: {reason}")

    async def _expire(self, ticket: TicketImport) -> None:
        """The lease ran out: fail a transfer still in flight, then let an uncommitted hold go."""
        self._leases.pop(ticket, None)
        entry = self._incoming.get(ticket.ticket_id)
        if entry is not None and entry.ticket is ticket:
            stalled = entry.receiving > 0 and entry.conn is not None
            ready = ticket.num_layers_ready
            reason = f"the lease expired with {ready} of {entry.caches.layout.num_layers} layers landed"
            await self._stop_transfer(ticket, reason)
            if stalled and entry.conn is not None:  # payloads the sender never delivered: it is stuck
                entry.conn.abort("a ticket's payload stalled past its lease")
        if ticket._end_lease(LeaseState.ENDED) and ticket._on_expire is not None:
            notify(ticket._on_expire, ticket)

    async def _stop_transfer(self, ticket: TicketImport, reason: str) -> None:
        """Fail the ticket's transfer if it is in flight; return once no unpack writes its blocks."""
        entry = self._incoming.get(ticket.ticket_id)
        if entry is None or entry.ticket is not ticket:
            return
        self._fail(entry, reason, tell_peer=True)
        while entry.scattering:
            await asyncio.sleep(0.001)
        if entry.writer_quiet is not None:
            await entry.writer_quiet.wait()  # the direct writer's Stopped (or its loss) frees the blocks

    async def _receive(self, conn: Connection, data: Data) -> None:
        entry = self._incoming.get(data.ticket)
        problem = self._refusal(entry, conn, data)
        if problem is not None or entry is None:
            problem = problem or "unknown ticket"
            if entry is not None:
                self._fail(entry, problem, tell_peer=False)
            await quietly(conn.send(Failed(data.ticket, problem)))
            await quietly(conn.discard_payload(data.tag))
            return
        entry.conn, entry.ticket.sender = conn, conn.peer
        entry.started = time.monotonic() if entry.started is None else entry.started
        if entry.ticket in self._leases:
            self._start_lease(entry.ticket, entry.lease_s)
        entry.claimed[data.first_layer : data.first_layer + data.num_layers] = [True] * data.num_layers
        async with self._slots:
            await self._land(entry, conn, data)

    async def _land(self, entry: Incoming, conn: Connection, data: Data) -> None:
        staging = self.pool.acquire(data.nbytes)
        try:
            entry.receiving += 1
            self.timeline.mark(data.ticket, Step.RECV_POSTED, data.first_layer)
            try:
                await conn.recv_payload(staging.data, data.tag)
            finally:
                entry.receiving -= 1
            self.timeline.mark(data.ticket, Step.PAYLOAD_LANDED, data.first_layer)
            if entry.failure is not None:
                return
            entry.scattering += 1
            try:
                bad = await self._unpacker.unpack(staging.data, data, entry.caches, entry.device_ids)
            finally:
                entry.scattering -= 1
            self.timeline.mark(data.ticket, Step.UNPACKED, data.first_layer)
            if bad is not None:
                layer = data.first_layer + bad // (2 * entry.block_ids.numel())
                self._fail(entry, f"checksum mismatch in layer {layer} (chunk {bad} of the payload)", tell_peer=True)
                return
        except Exception as e:  # the payload never arrived whole: truncated, or the connection died
            self._fail(entry, f"payload of layers {data.first_layer}+{data.num_layers} lost: {e}", tell_peer=True)
        finally:
            self.pool.release(staging)
        if entry.failure is not None:
            if entry.scattering == 0:
                self._publish(entry)
            return
        self._landed(entry, data.first_layer, data.num_layers, data.nbytes)

    def _landed(self, entry: Incoming, first_layer: int, num_layers: int, nbytes: int) -> None:
        entry.bytes_landed += nbytes
        for layer in range(first_layer, first_layer + num_layers):
            entry.ticket._ready[layer] = True
        if not all(entry.ticket._ready):
            return
        self._forget(entry, _COMPLETED)
        assert entry.started is not None and entry.conn is not None
        ticket_id = entry.ticket.ticket_id
        stats = TransferStats(
            ticket_id, entry.conn.peer, Direction.RECV, entry.bytes_landed, time.monotonic() - entry.started
        )
        entry.ticket.future.set_result(stats)
        self.timeline.mark(ticket_id, Step.LANDED)
        done = Done(ticket_id, entry.bytes_landed)
        if entry.conn.send_now(done):  # a direct writer's: over the side channel, before anything else here
            self.timeline.mark(ticket_id, Step.DONE_SENT)
        else:
            self._tasks.spawn(quietly(self._send_done(entry.conn, done)))
        notify(self._observer.on_complete, stats)

    async def _send_done(self, conn: Connection, done: Done) -> None:
        await conn.send(done)
        self.timeline.mark(done.ticket, Step.DONE_SENT)

    def _refusal(self, entry: Incoming | None, conn: Connection, data: Data) -> str | None:
        if entry is None:
            return self._endings.get(data.ticket, "unknown ticket (never expected here)")
        if entry.conn is not None and entry.conn is not conn:
            return f"the ticket is bound to peer {entry.conn.peer}"
        difference = entry.caches.layout.first_difference(conn.layout)
        if difference is not None:
            return f"the ticket's KV layout differs from the connection's: {difference}"
        return check_data(data, entry.block_ids.numel(), entry.layer_bytes, entry.claimed)

    def _fail(self, entry: Incoming, reason: str, *, tell_peer: bool) -> None:
        if entry.failure is not None:
            return
        ticket_id = entry.ticket.ticket_id
        peer = entry.conn.peer if entry.conn is not None else ""
        entry.failure = TransferFailed(peer, ticket_id, entry.bytes_landed, reason)
        self._forget(entry, reason)  # a late message hears the same reason
        report = log.info if reason.startswith(_SENDER_CANCELLED) else log.warning  # the sender chose to
        report("kv import failed", ticket=ticket_id, peer=peer, reason=reason)
        if tell_peer and entry.conn is not None and entry.conn.lost is None:
            self._tasks.spawn(quietly(entry.conn.send(Failed(ticket_id, reason))))
        if entry.quarantined:
            self._quarantine(entry)
        if entry.scattering == 0:
            self._publish(entry)

    def _publish(self, entry: Incoming) -> None:
        if entry.failure is None or entry.ticket.future.done() or entry.quarantined:
            return
        entry.ticket.future.set_exception(entry.failure)
        notify(self._observer.on_failure, entry.failure, Direction.RECV)

    def _forget(self, entry: Incoming, ending: str) -> None:
        ticket_id = entry.ticket.ticket_id
        if self._incoming.get(ticket_id) is entry:
            del self._incoming[ticket_id]
        self._endings[ticket_id] = ending
        while len(self._endings) > _REMEMBERED_ENDINGS:
            self._endings.popitem(last=False)
