"""Blocks between a CUDA KV cache and host slots (an offer's export, a fetch's import) without the
step thread ever waiting for the device: with torch's sync debug mode set to "error", any copy
that synchronises the stream raises. Runs on the GPU machine (marker gpu)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from engine.block_copy import copy_in
from kvtransfer.shm import SlabSink

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LAYERS, BLOCKS, SLOTS, BLOCK, HEADS, DIM = 4, 12, 8, 16, 2, 8


@contextmanager
def no_device_waits() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_an_export_and_an_import_queue_their_copies_without_waiting_for_the_device() -> None:
    torch.manual_seed(0)
    caches = [torch.randn(2, BLOCKS, BLOCK, HEADS, DIM, device="cuda") for _ in range(LAYERS)]
    # page-locked slots, as a KV store's mapping registered with CUDA (kvtransfer/shm.py)
    slabs = [torch.zeros(2, SLOTS, BLOCK, HEADS, DIM).pin_memory() for _ in range(LAYERS)]
    blocks, slots = [5, 2, 9, 7], [6, 0, 1, 2]  # scattered blocks into runs of slots, out of order

    sink = SlabSink(slabs, slots, deadline=time.monotonic() + 60)
    with no_device_waits():
        for layer, kv in enumerate(caches):
            sink.push_layer(layer, kv, blocks, len(blocks) * BLOCK)
        sink.close()
    sink.wait()
    assert sink.landed()
    for kv, slab in zip(caches, slabs, strict=True):
        assert torch.equal(slab[:, slots].cuda(), kv[:, blocks])

    into = [1, 11, 3, 4]
    with no_device_waits():
        event = copy_in(caches, into, slabs, slots)
    assert event is not None
    event.synchronize()
    for kv in caches:
        assert torch.equal(kv[:, into], kv[:, blocks])
