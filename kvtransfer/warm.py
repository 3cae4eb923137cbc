"""Connections to the peers a worker may push to, opened before a ticket needs them.

Dialing a peer costs a UCX endpoint, the handshake and, between GPUs of one host, the CUDA IPC
mapping of the peer's caches: ~40-60 ms on a GPU, which a ticket that dials pays inside its
request's time to first token (BENCHMARKS.md, "the first hand-off on a fresh prefill → decode
connection"). So a worker told which peers it may push to (the scheduler's answer to each load
report names them) connects to each in the background, and closes its connection to a peer that
leaves the list once no ticket uses it.

Nothing here is on a request's path: a connection that fails to open is tried again after a
backoff and never fails a ticket (a ticket to a peer with no connection dials as it comes, and one
to a peer dialing now waits for that dial, as two tickets do). Everything runs on the transport's
loop.

Dialing a listener that is being destroyed can crash the listening process inside UCX (a
connection request racing ucp_listener_destroy: openucx/ucx#11087), so the list names only peers
that report SERVING: a worker told to stop, or whose device is lost, reports DRAINING at once and
leaves the list at that report; it closes its transport only one report interval later, once
every prefill worker has heard (services/worker/server.py), and one whose device is lost never
closes it (its process ends at once); and a transport that is stopping dials nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from engine.kv_layout import KVLayout
from kvtransfer.connection import Connection, Tasks

log = structlog.get_logger(__name__)

_RETRY_FIRST_S = 1.0  # a failed connection is tried again after this, doubling up to _RETRY_MAX_S
_RETRY_MAX_S = 10.0


@dataclass
class _Backoff:
    next_try: float  # loop time
    wait_s: float


class WarmPeers:
    """The peers to keep a connection to, and the dials that open them (loop thread only)."""

    def __init__(
        self,
        layout: KVLayout,  # of the blocks this worker pushes: every connection is made for it
        connect: Callable[[str, KVLayout], Awaitable[Connection]],  # the transport's: shared with tickets
        connected: Callable[[str], Connection | None],  # the live connection to a peer, if any
        in_use: Callable[[Connection], bool],  # whether a ticket is being pushed over it
        tasks: Tasks,
    ) -> None:
        self._layout = layout
        self._connect = connect
        self._connected = connected
        self._in_use = in_use
        self._tasks = tasks
        self._wanted: frozenset[str] = frozenset()
        self._leaving: set[str] = set()  # left the list; their connection closes once idle
        self._trying: set[str] = set()
        self._backoff: dict[str, _Backoff] = {}
        self.opened = 0  # connections opened here, ahead of any ticket (read from any thread)

    def want(self, peers: frozenset[str]) -> None:
        """Keep a connection to every peer in `peers`: dial those without one (unless a recent try
        failed), and close the idle connections to peers no longer listed."""
        self._leaving |= self._wanted - peers
        self._leaving -= peers
        self._wanted = peers
        for address in [a for a in self._backoff if a not in peers]:
            del self._backoff[address]
        self._close_leaving()
        now = asyncio.get_running_loop().time()
        for address in sorted(peers):
            backoff = self._backoff.get(address)
            if address in self._trying or self._connected(address) is not None:
                continue
            if backoff is not None and backoff.next_try > now:
                continue
            self._trying.add(address)
            self._tasks.spawn(self._open(address))

    def _close_leaving(self) -> None:
        for address in list(self._leaving):
            conn = self._connected(address)
            if conn is None:
                self._leaving.discard(address)
            elif not self._in_use(conn):
                self._leaving.discard(address)
                log.info("kv peer left: its connection closes", peer=address)
                conn.abort("the peer left the mesh")

    async def _open(self, address: str) -> None:
        try:
            await self._connect(address, self._layout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the peer is not up yet, or went: tried again, tickets dial for themselves
            previous = self._backoff.get(address)
            wait = min(previous.wait_s * 2, _RETRY_MAX_S) if previous is not None else _RETRY_FIRST_S
            self._backoff[address] = _Backoff(asyncio.get_running_loop().time() + wait, wait)
            log.info("kv peer pre-connect failed", peer=address, retry_s=wait, error=f"{type(e).__name__}: {e}")
        else:
            self._backoff.pop(address, None)
            self.opened += 1
            if address not in self._wanted:  # it left the list while we dialed
                self._leaving.add(address)
                self._close_leaving()
        finally:
            self._trying.discard(address)
