"""One push's direct writes: its layer groups copied straight into the receiver's blocks over CUDA IPC.

A push to a peer whose cache this process has mapped (ipc.py) asks to write its ticket at once (wire.AskWrite)
and keeps each finished layer group here, with an event on the engine's stream marking it final,
until the receiver's grant arrives (its block ids, on the loop): then every kept group is copied on
the sender's copy stream, and later groups as they finish, on the engine's thread. The engine's
stream waits for the ticket's last copy, so whatever the engine writes into those blocks later is
ordered after every copy. If the grant has not come when the last layer is pushed, the push falls
back to packing and sending every group over UCX (KVPush), so the engine never waits on the network.

The lock orders the engine thread's launches against the loop's arm() and stop(): once stop() has
returned, nothing of this push is launched again, and once the copy stream has been synchronised
after it (KVSender does that on its waiter thread) nothing of it writes the receiver's blocks.
Nor is anything launched once the lease has run out as this side sees it (`valid_until`: a lease
from the moment before its last AskWrite or Hold was sent, never later than the receiver's own
expiry), so a writer that froze and woke up later does not write blocks its receiver let go.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

import torch

from kernels.kv_pack import copy_blocks, launch_copy
from kvtransfer.checksum import sample_chunks
from kvtransfer.ipc import PeerCaches
from kvtransfer.side import SideChannel
from kvtransfer.timeline import Step, Timeline
from kvtransfer.wire import Written


class DirectState(enum.Enum):
    PENDING = "pending"  # asked, no grant yet: groups are kept
    ARMED = "armed"  # granted: groups are copied as they finish
    PACKED = "packed"  # the last layer came before the grant (or the grant said no): UCX carries it all
    STOPPED = "stopped"  # the push failed or was cancelled: nothing is launched any more


@dataclass(slots=True)
class Group:
    first_layer: int
    layers: list[torch.Tensor]
    ready: torch.cuda.Event  # recorded on the engine's stream when the group was final


@dataclass(slots=True)
class Finished:
    """What the loop needs once the copies are queued: when they are done, and the sampled chunks."""

    written: torch.cuda.Event
    samples: torch.Tensor | None  # (k, chunk_bytes) uint8 gathered on the copy stream, for checksums
    chunks: list[int]


class DirectWrite:
    def __init__(
        self,
        peer: PeerCaches,
        stream: torch.cuda.Stream,
        num_layers: int,
        checksum_samples: int,
        lease_s: float,
        timeline: Timeline | None = None,
        ticket_id: str = "",
    ) -> None:
        self.peer = peer
        self.stream = stream  # the sender's copy stream, shared by its pushes
        self.state = DirectState.PENDING
        self.valid_until = time.monotonic() + lease_s  # launches only until then (the loop renews it)
        self._num_layers = num_layers
        self._checksum_samples = checksum_samples
        self._lock = threading.Lock()
        self._kept: list[Group] = []
        self._seen: list[torch.Tensor] = []  # every layer offered so far: the checksums sample them
        self._timeline = timeline
        self._ticket_id = ticket_id
        self._side: SideChannel | None = None  # the connection's side channel, when the grant came over one
        self._src_ids: torch.Tensor | None = None  # (num_blocks,) on the sender's device (the engine's stream's upload)
        self._dst_ids: torch.Tensor | None = None  # (num_blocks,) the grant's, on the sender's device (copy stream)

    # ---- the engine thread
    def offer(self, group: Group, src_ids: torch.Tensor, last: bool, ticket_key: str) -> list[Group] | Finished:
        """Copy the group now or keep it. Returns the groups the caller must pack and send over UCX
        instead (every one kept so far, once the push falls back), or, after the last group was
        copied, what the loop needs to report it Written."""
        with self._lock:
            self._src_ids = src_ids
            if self._checksum_samples:
                self._seen.extend(group.layers)
            self._check_lease()
            if self.state is DirectState.ARMED:
                self._launch(group)
                return self._finish(ticket_key) if last else []
            if self.state is DirectState.STOPPED:
                return []
            self._kept.append(group)
            if self.state is DirectState.PENDING and not last:
                return []
            self.state = DirectState.PACKED  # declined, or the last layer came before the grant
            kept, self._kept = self._kept, []
            return kept

    # ---- the loop
    def arm(self, dst_ids: torch.Tensor, side: SideChannel | None = None) -> bool:
        """The grant came with the receiver's block ids (on the sender's device, their upload queued
        on the copy stream, so every copy launched on it reads them after): copy what is kept.
        False when the push has already fallen back or stopped. `side`: the connection's side
        channel, which the Written takes (send_written)."""
        with self._lock:
            self._check_lease()
            if self.state is not DirectState.PENDING:
                return False
            self._side = side
            self._dst_ids = dst_ids
            self.state = DirectState.ARMED
            for group in self._kept:
                self._launch(group)
            self._kept = []
            return True

    def decline(self) -> None:
        """The grant said no (the ticket lands elsewhere than the mapped caches): UCX carries it."""
        with self._lock:
            if self.state is DirectState.PENDING:
                self.state = DirectState.PACKED

    def stop(self) -> torch.cuda.Event | None:
        """Launch nothing more; the event marks the end of every copy already launched (None: none were)."""
        with self._lock:
            launched = self.state is DirectState.ARMED
            self.state = DirectState.STOPPED
            self._kept = []
            if not launched:
                return None
            stopped = torch.cuda.Event()
            stopped.record(self.stream)
            return stopped

    # ---- the thread that saw the copies finish (direct_send.py)
    def send_written(self, written: Written) -> bool:
        """Send the Written over the side channel now, unless the push stopped first: under the
        lock, so a stop() either comes before (nothing is sent) or after (as for a failure after
        any Written). False: not sent (stopped, or no side channel: the loop sends a frame)."""
        with self._lock:
            if self.state is not DirectState.ARMED or self._side is None or not self._side.open:
                return False
            try:
                self._side.send(written)
            except ConnectionError:
                return False  # its buffer is full (the loop sends a frame), or it went down with its connection
            return True

    def renewed(self, until: float) -> None:
        """The loop sent an AskWrite or Hold just after time.monotonic() was until - lease."""
        self.valid_until = max(self.valid_until, until)

    # ---- under the lock
    def _check_lease(self) -> None:
        if self.state in (DirectState.PENDING, DirectState.ARMED) and time.monotonic() > self.valid_until:
            self.state = DirectState.STOPPED  # the loop's own deadline fails the push

    def _launch(self, group: Group) -> None:
        assert self._src_ids is not None and self._dst_ids is not None
        # planned (and checked) once per peer and group of layers: the caches stay the same tensors
        plan = self.peer.plan(group.first_layer, group.layers)
        self.stream.wait_event(group.ready)
        if plan is not None:
            launch_copy(plan, self._src_ids, self._dst_ids, self.stream)
        else:  # no Triton: the torch reference
            dst = self.peer.layers[group.first_layer : group.first_layer + len(group.layers)]
            with torch.cuda.stream(self.stream):
                copy_blocks(group.layers, self._src_ids, dst, self._dst_ids, use_triton=False)
        if self._timeline is not None:
            self._timeline.mark(self._ticket_id, Step.COPY_LAUNCHED, group.first_layer)

    def _finish(self, ticket_key: str) -> Finished:
        """After the last copy: gather the sampled chunks (still on the copy stream, so before the
        engine may overwrite its blocks), mark the end, and make the engine's stream wait for it."""
        assert self._src_ids is not None
        samples, chunks = None, []
        if self._checksum_samples:
            n = self._src_ids.numel()
            chunks = sample_chunks(self._num_layers * 2 * n, self._checksum_samples, ticket_key)
            with torch.cuda.stream(self.stream):
                samples = gather_chunks(self._seen, self._src_ids, chunks)
        written = torch.cuda.Event()
        written.record(self.stream)
        torch.cuda.current_stream(self.stream.device).wait_event(written)
        return Finished(written, samples, chunks)


def gather_chunks(layers: list[torch.Tensor], ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """(len(chunks), chunk_bytes) uint8: chunk c is layer c // 2n's K (or V) of block ids[c % n], numbered
    as in a packed message of every layer (checksum.py)."""
    n = ids.numel()
    rows = []
    for c in chunks:
        layer, kv, i = c // (2 * n), (c // n) % 2, c % n
        rows.append(layers[layer][kv].index_select(0, ids[i : i + 1]).reshape(-1).view(torch.uint8))
    return torch.stack(rows)
