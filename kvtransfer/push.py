"""KVPush: one ticket's sending side, as the prefill engine holds it (engine.handoff.KVExportSink).

Layers are grouped into messages of about config.message_bytes. On the engine's step thread, the
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

    def __init__(self, sender: KVSender, ticket: Ticket, layout: KVLayout) -> None:
        self.ticket = ticket
        self.layout = layout  # of the blocks pushed: the receiver's handshake must agree on it
        self.future: concurrent.futures.Future[TransferStats] = concurrent.futures.Future()
        self._sender = sender
        self._dtype: torch.dtype = getattr(torch, layout.dtype)
        self._next_layer = 0
        self._stopped = False  # cancelled or closed early: later calls do nothing
        self._group: Outbound | None = None  # the message being filled
        self._group_view = torch.empty(0)  # its staging as (n, 2, num_blocks, block_size, kv_heads, head_dim)
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
            self._sender.timeline.mark(self.ticket.ticket_id, Step.FIRST_LAYER)
        group = self._group or self._start_group(layer, len(block_ids), kv_layer.device)
        self._layers.append(kv_layer)
        self._next_layer += 1
        if self._next_layer < group.first_layer + group.num_layers:
            return
        # (n, 2, num_blocks, block_size, kv_heads, head_dim): the message's layers in one pack, one launch
        pack_blocks(self._layers, self._block_ids(block_ids, kv_layer.device), self._group_view)
        if kv_layer.is_cuda:
            group.packed = torch.cuda.Event()
            group.packed.record()
        self._sender.timeline.mark(self.ticket.ticket_id, Step.PACKED, group.first_layer)
        self._group, self._layers = None, []
        self._sender.submit(self, group)

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
        if self._group is not None:
            self._sender.pool.release(self._group.staging)
            self._group, self._layers = None, []
        self._sender.stop(self, reason)

    def _start_group(self, first: int, num_blocks: int, device: torch.device) -> Outbound:
        layout = self.layout
        layer_bytes = num_blocks * layout.block_elems_per_layer * self._dtype.itemsize
        n = min(max(1, self._sender.config.message_bytes // layer_bytes), layout.num_layers - first)
        staging = self._sender.pool.acquire(n * layer_bytes)
        shape = (n, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self._group = Outbound(first, n, staging, None, time.monotonic())
        self._group_view = staging.view(self._dtype, shape)
        return self._group

    def _block_ids(self, block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
        if self._ids is None or self._ids_list != list(block_ids):
            self._ids_list = list(block_ids)
            ids = torch.tensor(self._ids_list, dtype=torch.int64)
            # From pinned memory, queued on the engine's stream: a copy from pageable memory would
            # wait for every kernel the step has queued so far, stalling the engine thread mid-prefill.
            self._ids = ids.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else ids
        return self._ids
