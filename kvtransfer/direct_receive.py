"""The receiving side's direct writes, on the loop (KVReceiver's part): grants and the grant rule.

A sender whose connection mapped this worker's caches (ipc.py) asks to write a ticket (AskWrite);
the grant binds the ticket to that connection and sends the ticket's block ids: inline in the
Granted over the connection's side channel (side.py), else as a payload on the tag the Granted
names. Its Written lands
the ticket at once (after checking sampled checksums against the blocks, when it carries them).
A granted ticket that fails is quarantined: its failure is published (which lets the engine free
the blocks) only once the writer said Stopped, or a grace after its connection was lost; a writer
that stays silent for a grace is cut off. See docs/architecture.md, "kvtransfer".
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

import structlog

from kvtransfer.block_ids import encode_ids
from kvtransfer.caches import KVCaches
from kvtransfer.checksum import digest_rows
from kvtransfer.connection import Connection, Tasks, quietly
from kvtransfer.direct import gather_chunks
from kvtransfer.incoming import Incoming, check_written
from kvtransfer.side import MAX_INLINE_IDS
from kvtransfer.timeline import Step, Timeline
from kvtransfer.unpack import Unpacker
from kvtransfer.wire import Failed, Granted, Written

log = structlog.get_logger(__name__)


class DirectReceiving:
    """KVReceiver's direct-write half: the attributes and methods below the stubs are KVReceiver's."""

    caches: KVCaches | None
    loop: asyncio.AbstractEventLoop
    timeline: Timeline
    _tasks: Tasks
    _incoming: dict[str, Incoming]
    _endings: OrderedDict[str, str]
    _unpacker: Unpacker
    _grace_s: float
    _quarantined: dict[str, Incoming]

    def _hold(self, conn: Connection, ticket_id: str) -> None:
        raise NotImplementedError

    def _fail(self, entry: Incoming, reason: str, *, tell_peer: bool) -> None:
        raise NotImplementedError

    def _publish(self, entry: Incoming) -> None:
        raise NotImplementedError

    def _landed(self, entry: Incoming, first_layer: int, num_layers: int, nbytes: int) -> None:
        raise NotImplementedError

    def _ask(self, conn: Connection, ticket_id: str) -> None:
        """A Hold that asks to write the blocks directly: grant it if this connection mapped the
        caches the ticket lands in; from then on only that writer's Stopped (or its loss) lets a
        failed ticket's blocks go.

        Over a side channel the AskWrite is not ordered with the writer's UCX frames, and nothing
        here needs it to be: a Cancel heard first has ended the ticket (this ask is answered
        Failed); a Data heard first bound the ticket to this same connection (its push fell back
        and ignores the grant, and still sends Stopped if it fails, as it asked)."""
        self.timeline.mark(ticket_id, Step.ASK_HEARD)
        entry = self._incoming.get(ticket_id)
        if entry is None or (entry.conn is not None and entry.conn is not conn):
            ending = "the ticket is bound to another peer" if entry else self._endings.get(ticket_id, "unknown ticket")
            self._tasks.spawn(quietly(conn.send(Failed(ticket_id, ending))))
            return
        self._hold(conn, ticket_id)
        direct = conn.export_offered and entry.caches is self.caches
        if direct:
            entry.writer_quiet = asyncio.Event()
        if not self._grant_inline(conn, entry, direct):
            self._tasks.spawn(self._grant(conn, entry, direct))

    def _grant_inline(self, conn: Connection, entry: Incoming, direct: bool) -> bool:
        """The Granted over the side channel, with the block ids in it, now (False: it takes UCX).

        The Granted then travels apart from this ticket's Failed (UCX frames), so the writer may
        hear a Failed first: it then fails its push (sending Stopped, as it asked) and ignores the
        Granted, as it ignores any message of a push that ended. Nothing here waits for that order."""
        if direct and entry.block_ids.numel() > MAX_INLINE_IDS:
            return False  # too many for one side-channel message: a tag and a payload, over UCX
        ticket_id = entry.ticket.ticket_id
        granted = Granted(ticket_id, direct, block_ids=encode_ids(entry.block_ids) if direct else "")
        if not conn.send_now(granted):
            return False  # no side channel, or its buffer is full (one that failed takes its connection down)
        self.timeline.mark(ticket_id, Step.GRANT_SENT)
        return True

    async def _grant(self, conn: Connection, entry: Incoming, direct: bool) -> None:
        """The Granted as a control frame, and the block ids as a payload on the tag it names."""
        ticket_id = entry.ticket.ticket_id
        tag = conn.next_tag() if direct else 0
        try:
            await conn.send(Granted(ticket_id, direct, tag))
            if direct:
                await conn.send_payload(entry.block_ids, tag)
            self.timeline.mark(ticket_id, Step.GRANT_SENT)
        except Exception as e:  # the connection's loss handler fails the ticket
            log.debug("kv grant send failed", ticket=ticket_id, error=str(e))

    def _written(self, conn: Connection, written: Written) -> None:
        """Every layer is in the blocks: land the ticket at once, or after checking sampled checksums."""
        entry = self._incoming.get(written.ticket)
        problem = check_written(written, entry, conn) if entry is not None else None
        if entry is None or problem is not None:
            reason = problem or self._endings.get(written.ticket, "unknown ticket")
            if entry is not None:
                self._fail(entry, reason, tell_peer=True)
            else:
                self._tasks.spawn(quietly(conn.send(Failed(written.ticket, reason))))
            return
        entry.started = time.monotonic() if entry.started is None else entry.started
        if written.checksums:
            self._tasks.spawn(self._check_written(entry, written))
        else:
            self._landed(entry, 0, len(entry.claimed), written.bytes)

    async def _check_written(self, entry: Incoming, written: Written) -> None:
        entry.scattering += 1  # a read of the blocks: a failure meanwhile waits for it
        try:
            device = entry.caches.tensors[0].device
            bad = await self._unpacker.run(device, self._first_bad_chunk, entry, written)
        finally:
            entry.scattering -= 1
        if bad is not None:
            layer = bad // (2 * entry.block_ids.numel())
            self._fail(entry, f"checksum mismatch in layer {layer} (chunk {bad} of the ticket)", tell_peer=True)
        if entry.failure is not None:
            if entry.scattering == 0:
                self._publish(entry)
            return
        self._landed(entry, 0, len(entry.claimed), written.bytes)

    def _first_bad_chunk(self, entry: Incoming, written: Written) -> int | None:
        """On the scatter thread: the first sampled chunk of the blocks whose digest differs from the writer's."""
        chunks = [c for c, _ in written.checksums]
        rows = gather_chunks(list(entry.caches.tensors), entry.device_ids, chunks)
        got = digest_rows(rows.cpu(), chunks)
        return next((c for (c, want), (_, have) in zip(written.checksums, got, strict=True) if want != have), None)

    def _quarantine(self, entry: Incoming) -> None:
        """Keep a failed ticket's blocks until its direct writer lets them go (Stopped). A writer
        that says nothing within the grace is cut off: its connection's loss starts the release."""
        self._quarantined[entry.ticket.ticket_id] = entry
        conn = entry.conn
        if conn is None or conn.lost is not None:
            self.loop.call_later(self._grace_s, self._release, entry)
            return

        def overdue() -> None:
            if entry.quarantined and conn.lost is None:
                conn.abort("a direct writer did not confirm it stopped writing a failed ticket")

        self.loop.call_later(self._grace_s, overdue)

    def _release(self, entry: Incoming) -> None:
        if self._quarantined.get(entry.ticket.ticket_id) is entry:
            del self._quarantined[entry.ticket.ticket_id]
        if entry.writer_quiet is not None:
            entry.writer_quiet.set()
        if entry.scattering == 0:
            self._publish(entry)
