"""The receiver's record of one expected ticket, and the checks a sender's messages must pass."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtransfer.caches import KVCaches
from kvtransfer.connection import Connection
from kvtransfer.errors import TransferFailed
from kvtransfer.ticket_import import TicketImport
from kvtransfer.wire import Data, Written


@dataclass(slots=True, eq=False)
class Incoming:
    """The loop's record of one expected ticket."""

    ticket: TicketImport
    caches: KVCaches  # where the blocks are
    block_ids: torch.Tensor  # (num_blocks,) int64 on the host, validated once
    device_ids: torch.Tensor  # the same on the caches' device, copied at registration
    layer_bytes: int  # one layer of the ticket, packed
    lease_s: float  # the sender's longest allowed silence
    claimed: list[bool]  # per layer: a Data header for it was accepted
    conn: Connection | None = None  # bound by the first Hold or accepted Data header
    started: float | None = None
    bytes_landed: int = 0
    receiving: int = 0  # payload receives posted and not completed
    scattering: int = 0  # unpacks in progress (on the loop or the scatter thread)
    failure: TransferFailed | None = None
    # Set when the ticket was granted to a direct writer (its conn): until then the writer may
    # still write the blocks, so a failure is published (and the blocks freed) only once it is set:
    # by the writer's Stopped, or a grace after its connection was lost (receiver.py).
    writer_quiet: asyncio.Event | None = None

    @property
    def quarantined(self) -> bool:
        return self.writer_quiet is not None and not self.writer_quiet.is_set()


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


def check_written(written: Written, entry: Incoming, conn: Connection) -> str | None:
    """Why a Written cannot be accepted for a ticket, or None when it can."""
    if entry.writer_quiet is None or entry.conn is not conn:
        return "the ticket was not granted to this sender for direct writes"
    want = entry.layer_bytes * len(entry.claimed)
    if written.bytes != want:
        return f"the sender wrote {written.bytes} bytes; the ticket's blocks are {want}"
    chunks = len(entry.claimed) * 2 * entry.block_ids.numel()
    if any(not 0 <= c < chunks for c, _ in written.checksums):
        return "a checksum names a block outside the ticket"
    return None
