"""KV blocks through POSIX shared memory, between a KV store and the workers on its host.

Why. Between a GPU worker and the store on one H200 host UCX moved large messages as "rendezvous
fragmented copy-in copy-out" over tcp, ~0.6 GB/s: an 8k-token prefix (1 GB) took 1.6 s to fetch
against 0.33 s to recompute. A worker on the store's host needs no socket at all: the store keeps
its memory tier in a file of /dev/shm, the worker maps the same file, and a fetch or an offer is a
copy between that mapping and the worker's KV cache (host to device at PCIe/C2C speed when the
mapping is registered with CUDA), with only slot numbers and leases over gRPC.

The file is a header page, then the arena: the header holds a random 64-bit arena id, which a
worker checks after mapping the file and names in every call. A worker in another container (its
own /dev/shm) finds no file or another id, and a restarted store's new file has a new id, so a
worker never reads or writes an arena other than the one the store means: it maps it again, or
uses UCX. The arena is cut per layer exactly as a worker's paged KV cache is, one
(2, num_slots, block_size, kv_heads, head_dim) tensor per layer (`slab_tensors`), on both sides.
A GPU worker registers its mapping mapped, so that its device addresses it too: an offer then goes
into the slots in one kernel launch (`SlabSink` with a kvtransfer.slab_writer.SlabWriter).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from engine.block_copy import copy_out, device_ids, record_event, slot_runs
from engine.kv_layout import KVLayout
from kvtransfer.slab_writer import SlabWriter

log = structlog.get_logger(__name__)
HEADER_BYTES = 4096  # one page before the arena: the arena id, then nothing
_PORTABLE, _MAPPED = 1, 2  # cudaHostRegisterPortable (every device), cudaHostRegisterMapped (a device address)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This host's identity for this boot (empty where the kernel does not say): two processes of
    one boot id may share /dev/shm; of two, never."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ArenaInfo:
    """Where a store's arena is, what it holds, and which host it is on (MapMemory's answer)."""

    path: str
    arena_bytes: int  # after the header page
    arena_id: int
    num_slots: int
    boot_id: str


def block_bytes(layout: KVLayout) -> int:
    """Bytes of one block, every layer, K and V."""
    return layout.num_layers * layout.block_elems_per_layer * torch.empty((), dtype=_dtype(layout)).element_size()


def slab_tensors(arena: torch.Tensor, layout: KVLayout, num_slots: int) -> list[torch.Tensor]:
    """arena: (nbytes,) uint8. Per layer a (2, num_slots, block_size, kv_heads, head_dim) view, the
    layers one after another: the one geometry the store and its workers both use."""
    layer_bytes = num_slots * block_bytes(layout) // layout.num_layers
    shape = (2, num_slots, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return [
        arena[i * layer_bytes : (i + 1) * layer_bytes].view(_dtype(layout)).view(shape)
        for i in range(layout.num_layers)
    ]


def create_arena(path: Path, nbytes: int) -> tuple[torch.Tensor, int]:
    """(arena, arena id): a new file of the header and `nbytes`, mapped shared. A file of the same
    name (a store of this name killed before it could remove it) is replaced. OSError when
    /dev/shm lacks room: a tmpfs that runs out while a page is first written kills the writer
    (SIGBUS), so the room is checked before, not found missing later."""
    room = os.statvfs(path.parent)
    if room.f_bavail * room.f_frsize < HEADER_BYTES + nbytes:
        raise OSError(f"{path.parent} has {room.f_bavail * room.f_frsize} bytes free, {nbytes} wanted")
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # the store's user only
    try:
        os.ftruncate(fd, HEADER_BYTES + nbytes)
    finally:
        os.close(fd)
    mapped = torch.from_file(str(path), shared=True, size=HEADER_BYTES + nbytes, dtype=torch.uint8)
    arena_id = secrets.randbits(63)
    mapped[:8].view(torch.int64)[0] = arena_id
    return mapped[HEADER_BYTES:], arena_id


def open_arena(info: ArenaInfo) -> torch.Tensor | None:
    """The store's arena mapped read-write, or None where it is not the one `info` names (no such
    file here, another size, another id). torch.from_file creates a missing file, so the file's
    existence and size are checked first."""
    try:
        if os.stat(info.path).st_size != HEADER_BYTES + info.arena_bytes:
            return None
    except OSError:
        return None
    mapped = torch.from_file(info.path, shared=True, size=HEADER_BYTES + info.arena_bytes, dtype=torch.uint8)
    if int(mapped[:8].view(torch.int64)[0]) != info.arena_id:
        return None
    return mapped[HEADER_BYTES:]


def register(arena: torch.Tensor, device: torch.device | None = None) -> bool:
    """Page-lock the mapping for CUDA (cudaHostRegister), so copies between it and a GPU are DMA,
    not staged through a bounce buffer, and map it into the device's address space, so a kernel
    can write it (kvtransfer.slab_writer). Slow (seconds per GiB): call it off any event loop.
    False, the mapping unregistered, where CUDA refuses."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        result = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), _PORTABLE | _MAPPED)
    if int(result) != 0:
        log.warning("shared kv memory could not be registered with CUDA", bytes=arena.numel(), error=int(result))
        return False
    return True


def unregister(arena: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())


def _dtype(layout: KVLayout) -> torch.dtype:
    dtype = getattr(torch, layout.dtype)
    assert isinstance(dtype, torch.dtype)
    return dtype


class SlabSink:
    """A KVExportSink (engine.handoff) that writes exported blocks into a mapped store's slots:
    an offer over shared memory. Nothing is written once `deadline` (time.monotonic()) has passed,
    the offer's lease as the worker counts it: past it the store may give the slots to another
    block, and a late write would corrupt that block (copies queued before it may land a little
    later on CUDA; the store keeps the slots for twice the offer's lease, services/kvstore/shared.py).
    Slots outside the arena, or named twice, fail the sink before anything is written.

    With a `writer` (kvtransfer.slab_writer: the arena addressable by the cache's device) a pushed
    layer is only noted, and close() writes them all in one kernel launch, or none if the deadline
    has passed by then; without one, each layer is copied with torch as it is pushed. Either way the
    copies are queued on the current stream and nothing waits for the device: `landed()` (after
    close) says whether every layer was written in time; on CUDA wait() first, off the step thread."""

    def __init__(
        self, slabs: list[torch.Tensor], slots: list[int], deadline: float, writer: SlabWriter | None = None
    ) -> None:
        self.slabs = slabs
        self.slots = slots
        self.deadline = deadline
        self.writer = writer
        self.layers = 0  # layers written (queued)
        self.closed = False
        self.failure: str | None = _bad_slots(slots, slabs[0].shape[1])
        self.event: torch.cuda.Event | None = None
        self.device = torch.device("cpu")
        self._ids: torch.Tensor | None = None  # the blocks' ids on the cache's device, uploaded once for every layer
        self._runs = slot_runs(slots)
        self._noted: list[torch.Tensor] = []  # with a writer: the layers pushed, written at close()
        self._block_ids: Sequence[int] = ()

    def push_layer(self, layer: int, kv_layer: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> None:
        if self.failure is not None:
            return
        assert len(block_ids) == len(self.slots), "one slot per exported block"
        writer = self.writer
        if writer is not None and not writer.disabled and kv_layer.device == writer.device:
            assert layer == len(self._noted), "layers are pushed in order"
            self._noted.append(kv_layer)
            self._block_ids = block_ids
        elif self._in_time():
            self._copy_layer(layer, kv_layer, block_ids)

    def close(self) -> None:
        self.closed = True
        noted, self._noted = self._noted, []
        if noted and self.failure is None and self._in_time():
            self._write(noted)
        if self.layers:
            self.event = record_event(self.device)

    def cancel(self, reason: str) -> None:
        """Nothing more is queued (the noted layers stay the step thread's: a cancel may come from
        another thread while close() writes them, and wait() then waits for that write)."""
        self.failure = reason

    def wait(self) -> None:
        """Until the queued copies are done (blocking: call it on a thread). An export that failed
        between two layers never closed the sink: what it queued is waited for on the whole device."""
        if self.event is not None:
            self.event.synchronize()
        elif self.layers and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def landed(self) -> bool:
        return self.closed and self.failure is None and self.layers == len(self.slabs)

    def _in_time(self) -> bool:
        if time.monotonic() < self.deadline:
            return True
        self.failure = "the offer's lease ran out before its blocks were written"
        return False

    def _copy_layer(self, layer: int, kv_layer: torch.Tensor, block_ids: Sequence[int]) -> None:
        if self._ids is None:
            self._ids = device_ids(block_ids, kv_layer.device)
        copy_out(kv_layer, self._ids, self.slabs[layer], self._runs)
        self.layers += 1
        self.device = kv_layer.device

    def _write(self, layers: list[torch.Tensor]) -> None:
        assert self.writer is not None
        try:
            self.writer.write(layers, self._block_ids, self.slots)
        except Exception as e:  # a launch refused (Triton, the driver): nothing was queued, so torch copies it
            log.warning("offer's one-launch copy failed: torch copies from now on", error=f"{type(e).__name__}: {e}")
            self.writer.disabled = True
            for layer, kv in enumerate(layers):
                self._copy_layer(layer, kv, self._block_ids)
            return
        self.device = layers[0].device
        self.layers = len(layers)


def _bad_slots(slots: Sequence[int], num_slots: int) -> str | None:
    """Why the store's slots cannot be written (None: they can): a slot outside the arena would be
    skipped by the kernel, or cut short by torch's slicing, and a repeat written twice."""
    if any(not 0 <= slot < num_slots for slot in slots):
        return f"the store named a slot outside its arena of {num_slots}"
    if len(set(slots)) != len(slots):
        return "the store named a slot twice"
    return None
