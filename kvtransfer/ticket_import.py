"""TicketImport: the receiving side of one ticket, as the decode engine holds it
(engine.handoff.KVImport), and the states of its lease.

KVReceiver (receiver.py) drives it on the transport's loop: marks layers ready, resolves its
future, ends its lease on expiry. commit(), cancel() and wait() come from the engine's or a
service's thread; commit() races expiry, so the lease's state changes under a lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from kvtransfer.telemetry import TransferStats
from kvtransfer.ticket import Ticket, TicketId

if TYPE_CHECKING:
    from kvtransfer.receiver import KVReceiver

CALL_TIMEOUT_S = 30.0  # a hop onto the transport's loop; only a wedged loop takes this long


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
        if done is not None and not on_loop(self._receiver.loop):
            done.result(CALL_TIMEOUT_S)  # on the loop the failure publishes once the unpack in progress ends

    def cancel_soon(self, reason: str) -> None:
        """cancel() for a caller that may not wait (a callback on another event loop): the lease
        ends now; the ticket fails on the transport's loop once no unpack writes its blocks."""
        self._receiver.cancel(self, reason)

    async def cancel_async(self, reason: str) -> None:
        """cancel() for a caller on another event loop (a gRPC servicer)."""
        done = self._receiver.cancel(self, reason)
        if done is not None:
            await asyncio.wait_for(asyncio.wrap_future(done), CALL_TIMEOUT_S)

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


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the caller runs on loop (where blocking on the loop would deadlock)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
