"""Caches and a store's slabs for the offer-copy tests (kvtransfer.shm.SlabSink, slab_writer)."""

from __future__ import annotations

import time

import torch

from kvtransfer.shm import SlabSink

SENTINEL = -7.0  # what every slot holds before an offer: a slot written shows other values


def caches(num_layers: int, num_blocks: int, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Random per-layer caches (2, num_blocks, block_size=4, kv_heads=2, head_dim=8)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, num_blocks, 4, 2, 8, generator=gen).to(dtype) for _ in range(num_layers)]


def slabs_like(kv_caches: list[torch.Tensor], num_slots: int) -> list[torch.Tensor]:
    """Host slabs (2, num_slots, *block) of the caches' dtype, every slot SENTINEL."""
    first = kv_caches[0]
    return [torch.full((2, num_slots, *first.shape[2:]), SENTINEL, dtype=first.dtype) for _ in kv_caches]


def offer(sink: SlabSink, kv_caches: list[torch.Tensor], block_ids: list[int]) -> SlabSink:
    """What Engine.export_blocks does with a sink: every layer pushed in order, then close."""
    for layer, kv in enumerate(kv_caches):
        sink.push_layer(layer, kv, block_ids, len(block_ids) * kv.shape[2])
    sink.close()
    return sink


def in_a_minute() -> float:
    return time.monotonic() + 60
