"""A decode worker's reservations: blocks held in the engine for a ticket, until the ticket is
committed, released, or its lease runs out.

The one owner of that state. reserve() holds the blocks (Engine.reserve) and asks the KV
receiver to expect the ticket into them; the receiver's lease is the only clock. commit() hands
the import to a generating request (the engine owns the blocks from then on); release() and an
expired lease give the blocks back to the engine once the receiver guarantees nothing writes them
any more. Every path frees a reservation's blocks exactly once. Who gets blocks first when they
are short is the line's (services/decode/line.py): a large hand-off waiting its turn is not
overtaken forever by smaller ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass

import structlog

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.errors import InvalidRequest, OutOfBlocks
from engine.ids import BlockId
from engine.kv_manager import blocks_for
from kvtransfer.errors import TransferFailed
from kvtransfer.receiver import TicketImport
from kvtransfer.ticket import Ticket
from kvtransfer.transport import KVTransport
from services.decode.line import Line
from services.status import LeaseExpired, TicketNotFound

log = structlog.get_logger(__name__)
_ENDED_MEMORY = 4096  # ended ticket ids remembered, so a late Generate hears "expired", not "unknown"


@dataclass(frozen=True)
class Reservation:
    """A ticket's blocks held in the engine (under the ticket's id) and the receiver's import."""

    imported: TicketImport

    @property
    def ticket(self) -> Ticket:
        return self.imported.ticket


class Reservations:
    def __init__(
        self, engine: AsyncEngine, transport: KVTransport, worker_id: str, lease_ms: int, line: Line | None = None
    ) -> None:
        self.engine = engine
        self.line = line or Line()
        self.transport = transport
        self.worker_id = worker_id
        self.lease_ms = lease_ms  # when Reserve asks for none
        self._held: dict[str, Reservation] = {}
        self._expired: dict[str, None] = {}  # an ordered set, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._freeing: set[asyncio.Task[None]] = set()  # kept from the garbage collector until done

    def __len__(self) -> int:
        return len(self._held)

    async def reserve(self, request_id: str, num_tokens: int, lease_ms: int = 0) -> Ticket:
        """Hold blocks for the first num_tokens prompt tokens and return the ticket to push into."""
        self._loop = asyncio.get_running_loop()
        ticket_id = f"{self.worker_id}/{request_id or 'anon'}/{uuid.uuid4().hex[:12]}"
        set_aside = self.line.set_aside(request_id) if request_id else 0
        try:
            blocks = await self.engine.call(lambda e: _hold(e, ticket_id, num_tokens, set_aside))
        except OutOfBlocks:
            if request_id:
                self.line.refused(request_id, blocks_for(num_tokens, self.engine.engine.config.cache.block_size))
            raise
        self.line.granted(request_id)
        lease_s = (lease_ms or self.lease_ms) / 1000
        try:
            imported = await self.transport.expect_async(ticket_id, blocks, num_tokens, lease_s, self._on_expire)
        except BaseException:
            await self.engine.abort(ticket_id)
            raise
        self._held[ticket_id] = Reservation(imported)
        return imported.ticket

    def commit(self, ticket_id: str, num_prompt_tokens: int) -> TicketImport:
        """The import a generating request takes over, with the reserved blocks."""
        reservation = self._held.pop(ticket_id, None)
        if reservation is None:
            if ticket_id in self._expired:
                raise LeaseExpired("ticket_id", f"{ticket_id!r} expired before Generate", "reserve again")
            raise TicketNotFound("ticket_id", f"{ticket_id!r} is not reserved here", "reserve first")
        if not reservation.imported.commit():  # the lease ran out a moment ago: its callback is on its way
            self._free_later(reservation, "lease expired")
            raise LeaseExpired("ticket_id", f"{ticket_id!r} expired before Generate", "reserve again")
        reserved = reservation.ticket.num_tokens
        if reserved != num_prompt_tokens:
            self._free_later(reservation, "prompt length mismatch")
            raise InvalidRequest(
                "prompt_token_ids",
                f"has {num_prompt_tokens} tokens, the ticket reserved {reserved}",
                "send the prompt the ticket was reserved for",
            )
        return reservation.imported

    async def release(self, ticket_id: str) -> bool:
        """Free an uncommitted ticket's blocks; False when it is not held (already gone)."""
        reservation = self._held.pop(ticket_id, None)
        if reservation is None:
            return False
        await self._free(reservation, "released by the scheduler")
        return True

    async def close(self) -> None:
        for ticket_id in list(self._held):
            await self._free(self._held.pop(ticket_id), "worker shutting down")

    def _on_expire(self, imported: TicketImport) -> None:
        """On the transport's thread: the lease ran out uncommitted and nothing writes the blocks."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._expired_now, imported.ticket_id)

    def _expired_now(self, ticket_id: str) -> None:
        reservation = self._held.pop(ticket_id, None)
        if reservation is None:  # committed or released first
            return
        self._expired[ticket_id] = None
        while len(self._expired) > _ENDED_MEMORY:
            self._expired.pop(next(iter(self._expired)))
        log.info("lease expired", ticket_id=ticket_id)
        self._free_later(reservation, "lease expired")

    def _free_later(self, reservation: Reservation, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._free(reservation, reason))
        self._freeing.add(task)
        task.add_done_callback(self._freeing.discard)

    async def _free(self, reservation: Reservation, reason: str) -> None:
        await reservation.imported.cancel_async(reason)  # after this nothing writes the blocks
        with contextlib.suppress(Exception):
            await self.engine.abort(reservation.ticket.ticket_id)


def _hold(engine: Engine, ticket_id: str, num_tokens: int, set_aside: int) -> list[BlockId]:
    """On the engine's thread, between steps: the blocks, if they leave `set_aside` blocks free
    beside the engine's own watermark for a request waiting longer."""
    if set_aside:
        cache = engine.config.cache
        stats = engine.stats()
        left = stats.num_free_blocks - blocks_for(num_tokens, cache.block_size)
        keep = int(stats.num_blocks * cache.reserve_watermark)
        if left - keep < set_aside:
            raise OutOfBlocks(
                f"{set_aside} blocks are set aside for a larger request waiting longer ({stats.num_free_blocks} of "
                f"{stats.num_blocks} are free); retry when requests finish"
            )
    return engine.reserve(ticket_id, num_tokens)


def import_failure(imported: TicketImport | None, detail: str | None) -> Exception:
    """The typed error of a request whose KV import failed inside the engine."""
    if imported is not None:
        error = imported.error()
        if isinstance(error, TransferFailed):
            return error
        return TransferFailed(imported.ticket.address, imported.ticket_id, 0, detail or "the KV import failed")
    return RuntimeError(detail or "the request failed")
