"""When a direct writer's copies have finished, seen from the receiver's process (direct writes, ipc.py).

The sender's copies of every ticket run on one in-order copy stream. Per connection it makes one
interprocess CUDA event and sends its handle in the Hello; the receiver opens it at the handshake
(and says so in its Welcome). After each ticket's last copy the sender records that event on the
copy stream and sends `Written` at once, without waiting for the copies: a query() that returns
True in the receiver proves that every copy queued before the most recent record has finished,
so the ticket has landed. The message's latency then overlaps the copies instead of following
them.

A writer that dies with its copies queued never completes its record, so nothing lands: the
connection's loss (or the lease) fails the ticket. The receiver never waits on such an event
with a blocking synchronize (a dead writer's record would hold the thread forever): it polls,
first on the loop, then on one watcher thread that polls every pending event and can drop one
(the ticket failed meanwhile).

The sender never destroys a connection's event while it runs: a receiver may query it until it
notices the connection is gone, and an imported event whose exporter destroyed it is undefined
behaviour. That is one small event per same-host connection whose peer opened it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time

import structlog
import torch

log = structlog.get_logger(__name__)

# A copy of a small ticket has finished by the time the Written arrives (a control message takes
# longer than the copy); polling this long on the loop beats a hop to the watcher thread.
_LOOP_POLL_S = 200e-6
_WATCH_POLL_S = 20e-6  # the watcher's sleep between rounds (a sleep this short takes ~60-80 µs)


def new_copies_event(device: torch.device) -> tuple[torch.cuda.Event, str] | None:
    """An interprocess event on `device` and its handle (base64) for the Hello; None if the driver refuses."""
    try:
        with torch.cuda.device(device):
            event = torch.cuda.Event(interprocess=True)
            handle = event.ipc_handle()
    except Exception as e:
        log.warning("kv copies event unavailable: Written waits for the copies", error=f"{type(e).__name__}: {e}")
        return None
    return event, base64.b64encode(handle).decode()


def open_copies_event(handle: str, device: torch.device) -> torch.cuda.Event | None:
    """The writer's event, opened in this process; None (its Written then waits for the copies) on any failure."""
    try:
        return torch.cuda.Event.from_ipc_handle(device, base64.b64decode(handle))
    except Exception as e:
        log.warning("kv copies event cannot be opened: Written waits for the copies", error=f"{type(e).__name__}: {e}")
        return None


async def finishes_soon(event: torch.cuda.Event, within_s: float = _LOOP_POLL_S) -> bool:
    """Whether event completes within `within_s`, queried between the loop's other callbacks."""
    deadline = time.monotonic() + within_s
    while not event.query():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0)
    return True


class CopiesWatch:
    """Polls events on a thread of its own until they complete, for coroutines on one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, device: torch.device) -> None:
        self._loop = loop
        self._device = device  # where the events were opened: current on the watcher thread
        self._pending: dict[asyncio.Future[None], torch.cuda.Event] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    async def finished(self, event: torch.cuda.Event) -> None:
        """Return once event has completed; raises what its query raised. Cancel it to stop watching."""
        if await finishes_soon(event):
            return
        done: asyncio.Future[None] = self._loop.create_future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the transport closed")
            self._pending[done] = event
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvtransfer-copies", daemon=True)
                self._thread.start()
            self._wake.notify()
        try:
            await done
        finally:
            with self._wake:
                self._pending.pop(done, None)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _run(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                pending = list(self._pending.items())
            for done, event in pending:
                try:
                    finished = event.query()
                except Exception as e:  # a driver error: the copies cannot be confirmed
                    self._settle(done, e)
                    continue
                if finished:
                    self._settle(done, None)
            time.sleep(_WATCH_POLL_S)

    def _settle(self, done: asyncio.Future[None], error: BaseException | None) -> None:
        with self._wake:
            if self._pending.pop(done, None) is None:
                return
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(_resolve, done, error)


def _resolve(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
