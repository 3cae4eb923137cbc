"""KVPush: one ticket's sending side, as the prefill engine holds it (engine.handoff.KVExportSink).

Layers are grouped into messages of about config.message_bytes. A push to a same-host GPU peer
whose cache this process has mapped writes each group straight into the receiver's blocks instead
(direct.py), once the receiver has granted it; otherwise, on the engine's step thread, the
push_layer that completes a message packs the message's layers into a pooled staging buffer in one
call (on CUDA one kernel launch, queued on the current stream, so the engine's later writes are
ordered after it) and hands the message to the transport's loop (KVSender, sender.py); then
push_layer returns. Packing a message's earlier layers only then, not one by one, relies on what
engine.handoff promises: a pushed layer's blocks stay final for the rest of the step, and the last
layer (which completes the last message) is pushed within that step. Per-layer packing cost a
host-side kernel launch per layer, which dominated small transfers on GPUs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.kv_layout import KVLayout
from kernels.kv_pack import pack_blocks
from kvtransfer.direct import DirectWrite, Finished, Group
from kvtransfer.staging import Staging
from kvtransfer.telemetry import TransferStats
from kvtransfer.ticket import Ticket
from kvtransfer.timeline import Step

if TYPE_CHECKING:
    from kvtransfer.sender import KVSender


@dataclass(slots=True)
class Outbound:
    """Packed layers [first_layer, first_layer + num_layers) of one ticket, ready once `packed` is."""

    first_layer: int
    num_layers: int
    staging: Staging
    packed: torch.cuda.Event | None  # None on CPU: packing was synchronous
    pushed_at: float


class KVPush:
    """One ticket's sending side. push_layer/close/cancel come from the engine thread; `future`
    resolves with TransferStats once the receiver has every layer, or raises TransferFailed."""

    def __init__(self, sender: KVSender, ticket: Ticket, layout: KVLayout, direct: DirectWrite | None = None) -> None:
        self.ticket = ticket
        self.layout = layout  # of the blocks pushed: the receiver's handshake must agree on it
        self.direct = direct  # set when the receiver's cache is mapped here: its layers may be written directly
        self.future: concurrent.futures.Future[TransferStats] = concurrent.futures.Future()
        self.started_at = 0.0  # time.monotonic() of the first push_layer
        self._sender = sender
        self._dtype: torch.dtype = getattr(torch, layout.dtype)
        self._next_layer = 0
        self._stopped = False  # cancelled or closed early: later calls do nothing
        self._group_first = 0  # the message being filled: its first layer and its size in layers
        self._group_size = 0
        self._layers: list[torch.Tensor] = []  # its layers pushed so far, packed when the last arrives
        self._ids: torch.Tensor | None = None  # (num_blocks,) int64 on the cache's device
        self._ids_list: list[int] = []

    def push_layer(self, layer: int, kv_layer: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> None:
        if self._stopped or self.future.done():
            return
        if layer != self._next_layer:
            raise ValueError(f"layers must be pushed in order: expected layer {self._next_layer}, got {layer}")
        if len(block_ids) != self.ticket.num_blocks:
            return self._stop(f"the request has {len(block_ids)} blocks, the ticket {self.ticket.num_blocks}")
        if layer == 0:
            self.started_at = time.monotonic()
            self._sender.timeline.mark(self.ticket.ticket_id, Step.FIRST_LAYER)
            # up now, while the engine computes the next layers, not when the last group is due
            self._block_ids(block_ids, kv_layer.device)
            self._sender.timeline.mark(self.ticket.ticket_id, Step.IDS_READY)
        if not self._layers:
            self._group_first, self._group_size = layer, self._layers_per_message(len(block_ids), layer)
        self._layers.append(kv_layer)
        self._next_layer += 1
        if self._next_layer < self._group_first + self._group_size:
            return
        layers, self._layers = self._layers, []
        timeline = self._sender.timeline
        timeline.mark(self.ticket.ticket_id, Step.GROUP_FULL, self._group_first)
        ids = self._block_ids(block_ids, kv_layer.device)  # uploaded at layer 0 unless the engine's ids changed
        if self.direct is None:
            return self._pack(self._group_first, layers, ids)
        ready = torch.cuda.Event()
        ready.record()  # on the engine's stream: the group's blocks are final from here
        last = self._next_layer == self.layout.num_layers
        outcome = self.direct.offer(Group(self._group_first, layers, ready), ids, last, self.ticket.ticket_id)
        if isinstance(outcome, Finished):
            self._sender.timeline.mark(self.ticket.ticket_id, Step.PACKED, self._group_first)
            self._sender.submit_written(self, outcome)
            return
        for group in outcome:  # the grant has not come (or said no): these go over UCX after all
            self._pack(group.first_layer, group.layers, ids)

    def close(self) -> None:
        if not self._stopped and self._next_layer != self.layout.num_layers:
            self._stop(f"closed after {self._next_layer} of {self.layout.num_layers} layers")

    def cancel(self, reason: str) -> None:
        if not self._stopped:
            self._stop(f"cancelled: {reason}")

    def wait(self, timeout: float | None = None) -> TransferStats:
        return self.future.result(timeout)

    def __await__(self) -> Generator[Any, None, TransferStats]:
        return asyncio.wrap_future(self.future).__await__()

    def _stop(self, reason: str) -> None:
        self._stopped = True
        self._layers = []
        self._sender.stop(self, reason)

    def _layers_per_message(self, num_blocks: int, first: int) -> int:
        layer_bytes = num_blocks * self.layout.block_elems_per_layer * self._dtype.itemsize
        return min(max(1, self._sender.config.message_bytes // layer_bytes), self.layout.num_layers - first)

    def _pack(self, first: int, layers: list[torch.Tensor], ids: torch.Tensor) -> None:
        """Pack a message's layers into a staging buffer (one launch, on the engine's stream) and hand it on."""
        layout, n = self.layout, len(layers)
        staging = self._sender.pool.acquire(n * ids.numel() * layout.block_elems_per_layer * self._dtype.itemsize)
        shape = (n, 2, ids.numel(), layout.block_size, layout.num_kv_heads, layout.head_dim)
        pack_blocks(layers, ids, staging.view(self._dtype, shape))
        message = Outbound(first, n, staging, None, self.started_at)
        if layers[0].is_cuda:
            message.packed = torch.cuda.Event()
            message.packed.record()
        self._sender.timeline.mark(self.ticket.ticket_id, Step.PACKED, first)
        self._sender.submit(self, message)

    def _block_ids(self, block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """(num_blocks,) int64 on the cache's device: uploaded once, again only if the engine's ids
        changed. The engine passes a list (a new one each layer): compared as it is, not copied."""
        ids = block_ids if isinstance(block_ids, list) else list(block_ids)
        if self._ids is None or ids != self._ids_list:
            self._ids_list = list(ids)  # our own copy: the caller's list may grow in place
            # From a pinned buffer, queued on the engine's stream: a copy from pageable memory would
            # wait for every kernel the step has queued so far, stalling the engine thread mid-prefill.
            self._ids = self._sender.source_ids(device).upload(self._ids_list)
        return self._ids
