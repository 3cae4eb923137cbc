"""An in-process KV hand-off: the sender writes straight into the receiver's blocks.

The real mesh moves KV between processes with kvtransfer; this link implements the same two
protocols (engine.handoff) inside one process, so tests can prove the hand-off hooks — export
layer by layer, import into reserved blocks — give the same tokens as one engine alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class InProcessImport:
    """Receiver side: done once every layer has been written into the reserved blocks."""

    def __init__(self, num_layers: int) -> None:
        self.layers_landed: set[int] = set()
        self.num_layers = num_layers
        self.failure: BaseException | None = None

    def done(self) -> bool:
        return len(self.layers_landed) == self.num_layers

    def error(self) -> BaseException | None:
        return self.failure

    def cancel(self, reason: str) -> None:
        if not self.done() and self.failure is None:
            self.failure = RuntimeError(f"cancelled: {reason}")


class InProcessExport:
    """Sender side: copies each finished layer's blocks into the receiver's reserved blocks."""

    def __init__(self, dst_kv_caches: list[torch.Tensor], dst_block_ids: Sequence[int], receiver: InProcessImport):
        self.dst = dst_kv_caches
        self.dst_blocks = torch.tensor(list(dst_block_ids), dtype=torch.int64, device=dst_kv_caches[0].device)
        self.receiver = receiver
        self.closed = False

    def push_layer(self, layer: int, kv_layer: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> None:
        if len(block_ids) != len(self.dst_blocks):
            raise ValueError(f"sender has {len(block_ids)} blocks, the reservation {len(self.dst_blocks)}")
        src = torch.tensor(list(block_ids), dtype=torch.int64, device=kv_layer.device)
        # (2, n, block_size, kv_heads, head_dim) gathered, then scattered into the receiver's blocks
        self.dst[layer].index_copy_(1, self.dst_blocks, kv_layer.index_select(1, src).to(self.dst[layer].device))
        self.receiver.layers_landed.add(layer)

    def close(self) -> None:
        self.closed = True

    def cancel(self, reason: str) -> None:
        self.receiver.failure = RuntimeError(f"sender cancelled: {reason}")
