"""Block copies between the KV cache and host slots laid out like it (a KV store's memory tier
mapped from shared memory: kvtransfer/shm.py), one contiguous run of slots at a time.

A host run `slab[k, a:b]` is one contiguous piece of memory, so it crosses to the GPU as one DMA
copy (non-blocking when the host memory is page-locked or registered); the cache's blocks need not
be contiguous, so they are gathered or scattered on the device (index_select / index_copy_).
Indexing the host side with a list instead would gather on the CPU into pageable memory first,
which then crosses synchronously: the cost a shared-memory path exists to avoid.

Nothing here waits for the device. These copies run on the engine's step thread between steps (an
offer's export, a fetch's import), so a wait would hold the next step back; and where another
process shares the GPU (a prefill and a decode worker on one card) a wait lasts until that
process's time slice ends. The block ids were once uploaded with torch.tensor(ids, device=...)
per layer: a copy from pageable memory, which synchronises the stream, 32 times per 16 MiB offer
run of an 8B model. Beside a busy prefill worker each run then held a decode worker's steps back
~20 ms, doubling its TPOT (BENCHMARKS.md, "Offers that waited for the device").

copy_out is an offer's copy where the device cannot address the store's mapping, and on CPU: a GPU
worker that registered the mapping mapped writes an offer in one kernel launch instead
(kvtransfer/slab_writer.py), these ~3 torch calls per layer costing its step thread 1.5 ms or more
per 16 MiB run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position in slots, first slot, length) of each run of consecutive slots, in order."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            pos, first, n = runs[-1]
            runs[-1] = (pos, first, n + 1)
        else:
            runs.append((i, slot, 1))
    return runs


def device_ids(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """(n,) int64 block ids on `device`, queued on the current stream without waiting (from pinned
    memory on CUDA; the host allocator keeps the pinned copy until the upload has read it)."""
    ids = torch.tensor(list(block_ids), dtype=torch.long)
    if device.type != "cuda":
        return ids
    return ids.pin_memory().to(device, non_blocking=True)


def copy_in(
    kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], slabs: Sequence[torch.Tensor], slots: Sequence[int]
) -> torch.cuda.Event | None:
    """Write slot `slots[i]` of every layer's slab into cache block `block_ids[i]`. On CUDA the
    copies are queued on the current stream (later steps are ordered after them) and the event
    recorded after the last one is returned: the slots must stay as they are until it completes."""
    assert len(block_ids) == len(slots)
    device = kv_caches[0].device
    ids = device_ids(block_ids, device)
    runs = slot_runs(slots)
    for kv, slab in zip(kv_caches, slabs, strict=True):
        for k in range(2):
            for pos, first, n in runs:
                staged = slab[k, first : first + n].to(device, non_blocking=True)
                kv[k].index_copy_(0, ids[pos : pos + n], staged)
    return record_event(device)


def copy_out(kv: torch.Tensor, ids: torch.Tensor, slab: torch.Tensor, runs: Sequence[tuple[int, int, int]]) -> None:
    """Write one layer's cache blocks `ids[i]` ((n,) int64 on the cache's device: device_ids) into
    the slab's slots, `runs` being slot_runs(slots) (queued on the current stream on CUDA: record an
    event after the last layer and wait for it, off the step thread, before the slots are read)."""
    assert ids.device == kv.device
    gathered = kv.index_select(1, ids)  # (2, n, block_size, kv_heads, head_dim): K and V in one launch
    for k in range(2):
        for pos, first, n in runs:
            slab[k, first : first + n].copy_(gathered[k, pos : pos + n], non_blocking=True)


def record_event(device: torch.device) -> torch.cuda.Event | None:
    """An event recorded on `device`'s current stream after what was queued so far (None off CUDA:
    the copies there are done when they return). That device's stream, not the calling thread's
    current device's: they differ for an engine on cuda:N in a process whose current device is another."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
