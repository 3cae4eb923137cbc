"""KVCaches: the paged KV tensors a ticket's blocks land in, and their layout. A worker's engine has
one set; a KV store keeps one per KV layout it holds and names it in each expect()."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_layout import KVLayout


@dataclass(frozen=True, eq=False)
class KVCaches:
    """Paged KV tensors a ticket's blocks live in, and their layout."""

    layout: KVLayout
    tensors: Sequence[torch.Tensor]  # per layer (2, num_blocks, block_size, kv_heads, head_dim)

    def check(self) -> None:
        """ValueError unless every tensor has the layout's shape and dtype, on one device."""
        layout, tensors = self.layout, self.tensors
        if len(tensors) != layout.num_layers:
            raise ValueError(f"kv_caches has {len(tensors)} layers, the layout {layout.num_layers}")
        first = tensors[0]
        want = (2, first.shape[1], layout.block_size, layout.num_kv_heads, layout.head_dim)
        for i, kv in enumerate(tensors):
            dtype = str(kv.dtype).removeprefix("torch.")
            if tuple(kv.shape) != want or dtype != layout.dtype or kv.device != first.device:
                got = f"{kv.dtype} {tuple(kv.shape)}"
                raise ValueError(f"kv_caches[{i}] is {got}, the layout wants {layout.dtype} {want}")

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].shape[1]
