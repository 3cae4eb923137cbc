"""The receiving side: expect a ticket into reserved blocks, scatter arrivals, report the outcome.

TicketImport is what the decode engine holds (engine.handoff.KVImport). KVReceiver, on the
transport's loop, checks every Data header against its ticket (known, from the bound peer, layers
in range and not seen, exact byte size) before receiving its payload into a pooled staging buffer,
then unpacks it into exactly the ticket's blocks on the receiver's own CUDA stream (never the
default stream the engine's step runs on). On CUDA the loop launches the unpack itself (one kernel)
and waits for it in place when it is small, a few tens of microseconds of copying, since a hop to
a thread and back costs ~0.3 ms; a larger unpack is waited for on a scatter thread, and host memory
and payloads with sampled checksums to verify (a read-back) are unpacked there, so the loop never
waits long. A ticket lands in the receiver's own caches (a worker's engine) unless expect() names others
(KVCaches: a KV store keeps one set per KV layout it holds); a Data header is accepted only over a
connection whose handshake agreed on that ticket's layout. A ticket that fails (lease, peer lost,
cancel, bad message) publishes its error only after any unpack in progress has finished: once
error() is set, or cancel() has returned, the transport never writes those blocks again, so the
engine may free them.

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
import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from engine.kv_layout import KVLayout
from kernels.kv_pack import unpack_blocks, validate_block_ids
from kvtransfer.checksum import first_mismatch
from kvtransfer.config import TransportConfig
from kvtransfer.connection import Connection, Tasks, notify, quietly
from kvtransfer.errors import TransferFailed
from kvtransfer.staging import StagingPool
from kvtransfer.telemetry import Direction, TransferObserver, TransferStats
from kvtransfer.ticket import Ticket, TicketId
from kvtransfer.timeline import Step, Timeline
from kvtransfer.wire import Cancel, Data, Done, Failed, Hold, Message

log = structlog.get_logger(__name__)

_REMEMBERED_ENDINGS = 1024  # why recent tickets ended, to answer late messages precisely
_COMPLETED = "the ticket already completed"
_CALL_TIMEOUT_S = 30.0  # a hop onto the transport's loop; only a wedged loop takes this long
_WAIT_ON_LOOP_BYTES = 64 << 20  # an unpack this small (~50 µs of copying on a GPU) is waited for on the loop


@dataclass(frozen=True, eq=False)
class KVCaches:
    """Paged KV tensors a ticket's blocks live in, and their layout."""

    layout: KVLayout
    tensors: Sequence[torch.Tensor]  # per layer (2, num_blocks, block_size, kv_heads, head_dim)

    def check(self) -> None:
        """ValueError unless every tensor has the layout's shape and dtype, on one device."""
        layout, tensors = self.layout, self.tensors
        if len(tensors) != layout.num_layers:
            raise ValueError(f"kv_caches has {len(tensors)} layers, the layout {layout.num_layers}")
        first = tensors[0]
        want = (2, first.shape[1], layout.block_size, layout.num_kv_heads, layout.head_dim)
        for i, kv in enumerate(tensors):
            dtype = str(kv.dtype).removeprefix("torch.")
            if tuple(kv.shape) != want or dtype != layout.dtype or kv.device != first.device:
                got = f"{kv.dtype} {tuple(kv.shape)}"
                raise ValueError(f"kv_caches[{i}] is {got}, the layout wants {layout.dtype} {want}")

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].shape[1]


class LeaseState(enum.Enum):
    HELD = "held"  # the lease runs: expiry or cancel frees the blocks
    COMMITTED = "committed"  # the decode engine owns the blocks; the lease only bounds the transfer
    ENDED = "ended"  # expired or cancelled


class TicketImport:
    """One ticket's receiving side: done() once every layer landed, error() once it failed."""

    def __init__(
        self, receiver: KVReceiver, ticket: Ticket, num_layers: int, on_expire: Callable[[TicketImport], None] | None
    ) -> None:
        self.ticket = ticket
        self.future: concurrent.futures.Future[TransferStats] = concurrent.futures.Future()
        self._receiver = receiver
        self._ready = [False] * num_layers  # written on the transport's loop
        self._on_expire = on_expire
        self._lock = threading.Lock()  # commit() (a service thread) races expiry (the loop)
        self._state = LeaseState.HELD
        self.sender: str | None = None  # the peer the ticket is bound to, from its first Hold or Data

    @property
    def ticket_id(self) -> TicketId:
        return self.ticket.ticket_id

    def done(self) -> bool:
        return self.future.done() and self.future.exception() is None

    def error(self) -> BaseException | None:
        return self.future.exception() if self.future.done() else None

    @property
    def num_layers_ready(self) -> int:
        return sum(self._ready)

    def commit(self) -> bool:
        """Take the blocks over from the lease; False when the lease already ended (expired, cancelled)."""
        return self._end_lease(LeaseState.COMMITTED)

    def cancel(self, reason: str) -> None:
        """End the lease, fail the ticket and tell the sender; when this returns nothing writes the blocks."""
        done = self._receiver.cancel(self, reason)
        if done is not None and not _on_loop(self._receiver.loop):
            done.result(_CALL_TIMEOUT_S)  # on the loop the failure publishes once the unpack in progress ends

    async def cancel_async(self, reason: str) -> None:
        """cancel() for a caller on another event loop (a gRPC servicer)."""
        done = self._receiver.cancel(self, reason)
        if done is not None:
            await asyncio.wait_for(asyncio.wrap_future(done), _CALL_TIMEOUT_S)

    def wait(self, timeout: float | None = None) -> TransferStats:
        return self.future.result(timeout)

    def __await__(self) -> Generator[Any, None, TransferStats]:
        return asyncio.wrap_future(self.future).__await__()

    def _end_lease(self, state: LeaseState) -> bool:
        with self._lock:
            if self._state is not LeaseState.HELD:
                return False
            self._state = state
            return True


@dataclass(slots=True, eq=False)
class _Incoming:
    """The loop's record of one expected ticket."""

    ticket: TicketImport
    caches: KVCaches  # where the blocks are
    block_ids: torch.Tensor  # (num_blocks,) int64 on the host, validated once
    layer_bytes: int  # one layer of the ticket, packed
    lease_s: float  # the sender's longest allowed silence
    claimed: list[bool]  # per layer: a Data header for it was accepted
    conn: Connection | None = None  # bound by the first Hold or accepted Data header
    started: float | None = None
    bytes_landed: int = 0
    receiving: int = 0  # payload receives posted and not completed
    scattering: int = 0  # unpacks in progress (on the loop or the scatter thread)
    failure: TransferFailed | None = None
    device_ids: torch.Tensor | None = None  # block_ids on the caches' device, copied at registration


def check_data(data: Data, num_blocks: int, layer_bytes: int, claimed: Sequence[bool]) -> str | None:
    """Why a Data header cannot be accepted for a ticket, or None when it can."""
    num_layers = len(claimed)
    if data.num_blocks != num_blocks:
        return f"the sender has {data.num_blocks} blocks, the reservation {num_blocks}"
    last = data.first_layer + data.num_layers
    if data.num_layers < 1 or data.first_layer < 0 or last > num_layers:
        return f"layers [{data.first_layer}, {last}) are outside [0, {num_layers})"
    if any(claimed[data.first_layer : last]):
        return f"layers [{data.first_layer}, {last}) overlap layers already sent"
    if data.nbytes != data.num_layers * layer_bytes:
        want = data.num_layers * layer_bytes
        return f"the payload is {data.nbytes} bytes; {data.num_layers} layers of this ticket are {want}"
    chunks = data.num_layers * 2 * num_blocks
    if any(not 0 <= c < chunks for c, _ in data.checksums):
        return "a checksum names a block outside the payload"
    return None


class KVReceiver:
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
        self._incoming: dict[str, _Incoming] = {}  # loop thread only
        self._leases: dict[TicketImport, asyncio.TimerHandle] = {}  # loop thread only
        self._endings: OrderedDict[str, str] = OrderedDict()
        self._slots = asyncio.Semaphore(config.max_inflight_recv)
        self._scatter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvtransfer-scatter")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # per CUDA device unpacked into

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
        registered.result(_CALL_TIMEOUT_S)
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
        await asyncio.wait_for(asyncio.wrap_future(registered), _CALL_TIMEOUT_S)
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

    def on_lost(self, conn: Connection, reason: str) -> None:
        for entry in [e for e in self._incoming.values() if e.conn is conn]:
            self._fail(entry, f"connection lost: {reason}", tell_peer=False)

    def shutdown(self) -> None:
        for lease in self._leases.values():
            lease.cancel()
        self._leases.clear()
        for entry in list(self._incoming.values()):
            self._fail(entry, "the transport closed", tell_peer=False)
        self._scatter.shutdown(wait=True)
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
        if _on_loop(self.loop):
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
        entry = _Incoming(ticket, caches, ids, layer_bytes, timeout_s, [False] * layout.num_layers)
        entry.device_ids = self._upload(ids, caches.tensors[0].device)
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

    async def _land(self, entry: _Incoming, conn: Connection, data: Data) -> None:
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
                bad = await self._unpack(staging.data, data, entry)
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
        self._landed(entry, data)

    async def _unpack(self, payload: torch.Tensor, data: Data, entry: _Incoming) -> int | None:
        """Unpack payload into the ticket's blocks and return once it is there; the first bad chunk instead
        when a sampled checksum does not match."""
        device = entry.caches.tensors[0].device
        if device.type != "cuda" or data.checksums:
            return await self.loop.run_in_executor(self._scatter, self._check_and_unpack, payload, data, entry)
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            self._check_and_unpack_here(payload, data, entry)
            unpacked = torch.cuda.Event()
            unpacked.record(stream)
        if data.nbytes <= _WAIT_ON_LOOP_BYTES:
            unpacked.synchronize()  # releases the GIL: the engine's thread runs on meanwhile
        else:
            await self.loop.run_in_executor(self._scatter, unpacked.synchronize)
        return None

    def _upload(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The ticket's block ids on the caches' device, copied on the stream its unpacks run on (so
        they are ordered after the copy) from pinned memory (so nothing here waits for it)."""
        if device.type != "cuda":
            return ids
        with torch.cuda.stream(self._stream(device)):
            return ids.to(device, non_blocking=True)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _check_and_unpack(self, payload: torch.Tensor, data: Data, entry: _Incoming) -> int | None:
        """On the scatter thread: verify the sampled checksums of payload (nbytes,) uint8, then unpack it
        into the ticket's blocks of those layers; returns the first bad chunk instead when one is.

        The device work happens on the receiver's own stream, never on the default stream the
        engine's step runs on, so it neither waits for a step nor makes a step wait for it; it is
        finished when this returns.
        """
        device = entry.caches.tensors[0].device
        if device.type != "cuda":
            return self._check_and_unpack_here(payload, data, entry)
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            bad = self._check_and_unpack_here(payload, data, entry)
        stream.synchronize()
        return bad

    def _check_and_unpack_here(self, payload: torch.Tensor, data: Data, entry: _Incoming) -> int | None:
        if data.checksums:
            chunk_bytes = entry.layer_bytes // (2 * entry.block_ids.numel())
            bad = first_mismatch(payload, chunk_bytes, data.checksums)
            if bad is not None:
                return bad
        layout, tensors = entry.caches.layout, entry.caches.tensors
        assert entry.device_ids is not None  # made by _register
        layers = list(tensors[data.first_layer : data.first_layer + data.num_layers])
        shape = (data.num_layers, 2, data.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        unpack_blocks(payload.view(tensors[0].dtype).view(shape), layers, entry.device_ids)
        return None

    def _landed(self, entry: _Incoming, data: Data) -> None:
        entry.bytes_landed += data.nbytes
        for layer in range(data.first_layer, data.first_layer + data.num_layers):
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
        notify(self._observer.on_complete, stats)
        self._tasks.spawn(quietly(self._send_done(entry.conn, Done(ticket_id, entry.bytes_landed))))

    async def _send_done(self, conn: Connection, done: Done) -> None:
        await conn.send(done)
        self.timeline.mark(done.ticket, Step.DONE_SENT)

    def _refusal(self, entry: _Incoming | None, conn: Connection, data: Data) -> str | None:
        if entry is None:
            return self._endings.get(data.ticket, "unknown ticket (never expected here)")
        if entry.conn is not None and entry.conn is not conn:
            return f"the ticket is bound to peer {entry.conn.peer}"
        difference = entry.caches.layout.first_difference(conn.layout)
        if difference is not None:
            return f"the ticket's KV layout differs from the connection's: {difference}"
        return check_data(data, entry.block_ids.numel(), entry.layer_bytes, entry.claimed)

    def _fail(self, entry: _Incoming, reason: str, *, tell_peer: bool) -> None:
        if entry.failure is not None:
            return
        ticket_id = entry.ticket.ticket_id
        peer = entry.conn.peer if entry.conn is not None else ""
        entry.failure = TransferFailed(peer, ticket_id, entry.bytes_landed, reason)
        self._forget(entry, reason)  # a late message hears the same reason
        log.warning("kv import failed", ticket=ticket_id, peer=peer, reason=reason)
        if tell_peer and entry.conn is not None and entry.conn.lost is None:
            self._tasks.spawn(quietly(entry.conn.send(Failed(ticket_id, reason))))
        if entry.scattering == 0:
            self._publish(entry)

    def _publish(self, entry: _Incoming) -> None:
        if entry.failure is None or entry.ticket.future.done():
            return
        entry.ticket.future.set_exception(entry.failure)
        notify(self._observer.on_failure, entry.failure, Direction.RECV)

    def _forget(self, entry: _Incoming, ending: str) -> None:
        ticket_id = entry.ticket.ticket_id
        if self._incoming.get(ticket_id) is entry:
            del self._incoming[ticket_id]
        self._endings[ticket_id] = ending
        while len(self._endings) > _REMEMBERED_ENDINGS:
            self._endings.popitem(last=False)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
