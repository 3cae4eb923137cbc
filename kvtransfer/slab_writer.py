"""An offer's blocks written into a KV store's mapped slots by one kernel launch, every layer at once.

Why. The copy of an offer runs on the engine's step thread, between two steps. Done with torch, it
is per layer an index_select and a copy per run of slots, K and V: ~96 torch calls and 3.5 ms of
host time per 16 MiB run of Llama-8B blocks on an H100, which at 64 concurrent requests cost a
decode worker 2.9 s of a 37 s run (BENCHMARKS.md, "c64 in a longer run on two H100s").

How. A worker on the store's host registers its mapping of the store's arena with CUDA as mapped
(shm.register), so the GPU can address those host pages itself: `device_arena` is the arena as a
CUDA tensor over the same pages (at the device address CUDA names for them; the same number as the
host address under UVA, asked all the same). Slabs cut from it (shm.slab_tensors) are ordinary
destination layers for kernels.kv_pack's block-to-block copy: cache block `block_ids[i]` of every
layer, K and V, into slot `slots[i]`, in one Triton launch whose plan (the layer tables, then the
compiled kernel launched directly) is worked out when the mapping is made, off the step thread
(SlabWriter.prepare), and kept while the engine's caches stay where they are. The kernel's stores
cross PCIe as it runs (16 MiB in ~0.5 ms on an H100), queued on the engine's stream like the torch
copies were, so what comes after is ordered after them.

Where the device cannot address the mapping (registration refused, no mapped flag, no Triton, a
launch refused at prepare) there is no writer, and kvtransfer.shm.SlabSink copies with torch as
before. The CPU path never gets here.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import structlog
import torch

from kernels.kv_pack import CopyPlan, launch_copy, plan_copy

log = structlog.get_logger(__name__)


class _DeviceMemory:
    """Device memory as torch.as_tensor reads it (the CUDA array interface), keeping `owner` (the
    host tensor whose pages these are) alive while any view of it is."""

    def __init__(self, pointer: int, nbytes: int, owner: torch.Tensor) -> None:
        self.owner = owner
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": (nbytes,), "typestr": "|u1", "data": (pointer, False), "version": 2, "strides": None,
        }  # fmt: skip


def device_arena(arena: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The registered arena as the GPU addresses it: a (nbytes,) uint8 tensor on `device` over the
    same host pages; None where CUDA names no device address for it (registered without the
    mapped flag, or refused). Call on the thread that registered it (its CUDA context is current)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")  # the driver, already loaded by torch: no other binding exposes this
    except OSError as e:
        log.info("shared kv memory not addressable by the device: no CUDA driver", error=str(e))
        return None
    pointer = ctypes.c_uint64()
    result = cuda.cuMemHostGetDevicePointer_v2(ctypes.byref(pointer), ctypes.c_void_p(arena.data_ptr()), 0)
    if result != 0:
        log.info("shared kv memory not addressable by the device: torch copies", error=int(result))
        return None
    try:
        return torch.as_tensor(_DeviceMemory(pointer.value, arena.numel(), arena), device=device)
    except (RuntimeError, TypeError, ValueError) as e:
        log.info("shared kv memory not addressable by the device: torch copies", error=str(e))
        return None


class SlabWriter:
    """Writes cache blocks into a mapped arena's slots in one launch (see the module docstring).

    slabs: per layer (2, num_slots, block_size, kv_heads, head_dim) on the device that will write
    them (views of device_arena; CPU tensors under Triton's interpreter, in tests)."""

    def __init__(self, slabs: list[torch.Tensor]) -> None:
        self.slabs = slabs
        self.device = slabs[0].device
        self.num_slots = slabs[0].shape[1]
        self.disabled = False  # a launch failed once: torch copies from then on
        self._plan: CopyPlan | None = None
        self._planned_for: tuple[int, ...] = ()  # the caches' addresses the plan is for

    def write(self, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], slots: Sequence[int]) -> None:
        """slab[l][kv, slots[i]] = kv_caches[l][kv, block_ids[i]] for every layer, queued on the
        current stream without waiting for the device. The slots must be distinct and in the arena
        (SlabSink checks): the kernel skips one outside it rather than write past the arena."""
        n = len(block_ids)
        assert n == len(slots)
        if n == 0:
            return
        plan = self._plan_for(kv_caches)
        # Block ids and slots in one upload; a row of even length keeps the slots 16-byte aligned,
        # as launch_copy's direct launch wants. Padding ids are -1: never launched over (n only).
        width = n + n % 2
        pad = [-1] * (width - n)
        ids = torch.tensor([[*block_ids, *pad], [*slots, *pad]], dtype=torch.int64)
        if self.device.type == "cuda":
            ids = ids.pin_memory().to(self.device, non_blocking=True)  # the host allocator keeps it until read
        launch_copy(plan, ids[0, :n], ids[1, :n])

    def prepare(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """Plan for these caches and have Triton compile and load the kernel now, by a launch that
        writes nothing (its one block id, -1, is outside every cache), on a stream of its own and
        waited for: otherwise the first offer pays the compile on the step thread (a fraction of a
        second, more where Triton's cache is cold). Call it off the step thread, once the engine's
        graphs are captured; it raises what planning or the launch raises."""
        plan = self._plan_for(kv_caches)
        if self.device.type != "cuda":
            nothing = torch.full((2, 2), -1, dtype=torch.int64)
            launch_copy(plan, nothing[0, :1], nothing[1, :1])
            return
        side = torch.cuda.Stream(self.device)
        with torch.cuda.stream(side):
            nothing = torch.full((2, 2), -1, dtype=torch.int64, device=self.device)  # rows 16-byte aligned
            launch_copy(plan, nothing[0, :1], nothing[1, :1], stream=side)
        side.synchronize()

    def _plan_for(self, kv_caches: Sequence[torch.Tensor]) -> CopyPlan:
        addresses = tuple(kv.data_ptr() for kv in kv_caches)
        if self._plan is None or addresses != self._planned_for:
            self._plan, self._planned_for = plan_copy(kv_caches, self.slabs), addresses
        return self._plan
