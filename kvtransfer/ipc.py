"""Direct writes over CUDA IPC: a receiver's KV caches mapped into a same-host sender's process.

When both workers are GPU processes of one host (the same boot id and PID namespace: CUDA IPC
needs both), the receiver exports its cache tensors once per connection at the handshake and the
sender maps them once (torch's own storage IPC, as torch.multiprocessing shares CUDA tensors:
the mapping is the whole cudaMalloc allocation, plus the storage's offset into it). The sender
then gathers a ticket's blocks from its cache straight into the receiver's blocks with one kernel
per group of layers (kernels.kv_pack.copy_blocks): no staging buffer, no UCX payload. Which writes
a receiver allows, and until when, is its grant rule (receiver.py, docs/architecture.md).

Anything that fails here (no IPC between the processes, a driver that refuses the handle) only
means the connection carries KV over UCX as before.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch

from engine.kv_layout import KVLayout
from kernels._triton import triton_available
from kernels.kv_pack import CopyPlan, plan_copy

log = structlog.get_logger(__name__)

EXPORT_TAG = 1 << 62  # the tag the export travels on after a Welcome that offers it (payload tags count up from 2)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_SHM = Path("/dev/shm")
# torch's ref-counter file is an at::RefcountedMapAllocator mapping: the allocator's own header
# (its count of mappers), then one int64 count per share
_COUNTER_FILE_HEADER_BYTES = 64


def host_identity() -> str:
    """Who can share CUDA memory with this process: the boot id and the PID namespace ("" if unknown)."""
    try:
        return f"{_BOOT_ID.read_text().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def _counter(entry: dict[str, Any]) -> tuple[bytes, int]:
    """Where torch counts an entry's share: its ref-counter file and the slot in it."""
    handle = _unb64(entry["ref_handle"])
    assert handle is not None
    return handle, int(entry["ref_offset"])


def _release_counter(handle: bytes, offset: int) -> None:
    torch.UntypedStorage._release_ipc_counter(handle, offset)


def _release(counters: Iterable[tuple[bytes, int]]) -> None:
    for handle, offset in counters:
        _release_counter(handle, offset)


def share_count(handle: bytes, offset: int) -> int | None:
    """A share's count as torch keeps it, read from its ref-counter file (None: unreadable)."""
    try:
        with open(_SHM / handle.decode().lstrip("/"), "rb") as counters:
            counters.seek(_COUNTER_FILE_HEADER_BYTES + 8 * offset)
            raw = counters.read(8)
    except (OSError, UnicodeDecodeError):
        return None
    return int.from_bytes(raw, sys.byteorder, signed=True) if len(raw) == 8 else None


def process_gone(pid: int) -> bool:
    """Whether no process of this PID namespace has `pid` (a zombie, not yet reaped, still has it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, another user's
        return False
    return False


@dataclass(eq=False)
class CacheExport:
    """Our caches exported to one connection's peer: one torch share of each distinct storage.

    torch counts every share (torch/csrc/CudaIPCTypes.cpp): a counter set to 1 that the one
    process mapping it takes back down when its mapping goes, and a slot that the share holds
    until torch frees it, once both the shared storage is gone and the counter is down. A slot
    still held when the process ends is what makes torch print "Producer process has been
    terminated before all shared CUDA tensors released". Sharing the engine's cache storages
    themselves tied every share to the caches, which live to the end of the process (past it
    when anything still refers to them then), and one export went to every dialer although each
    share counts one mapping. Here each connection's shares are made on DLPack aliases of the
    storages that this object holds (an alias keeps the caches' memory, not the engine's tensors):
    close() drops them when the connection ends, and torch frees each share as soon as the peer's
    mapping is gone too; one the peer still maps, torch keeps (alias, memory and all) until it is.
    """

    blob: bytes  # what the peer maps (open_caches)
    _aliases: list[torch.UntypedStorage]
    _counters: list[tuple[bytes, int]]
    peer_pid: int = 0  # the peer's process (of our host and PID namespace), from its Hello; 0 unknown

    def close(self) -> None:
        """The connection ended: our side of its shares goes (torch frees each once the peer's has)."""
        self._aliases = []

    def withdraw(self) -> None:
        """The peer never received the export: take its counts down for it, then close."""
        counters, self._counters = self._counters, []
        _release(counters)
        self.close()

    def release_for_dead_peer(self, gone: Callable[[int], bool] = process_gone) -> bool:
        """After close(): if the peer's process is gone (SIGKILLed while it mapped our caches, its
        torch never took its counts down), take down each count it left up, and True; False while
        it may live (or is unknown): ask again later. Safe only because it is dead: the driver
        unmapped its mappings with it, and nothing else counts these shares. A count it took down
        itself before it died (at 0) is left alone: taken down again it would wrap (torch counts
        in uint64) and never be freed. Each share at most once from this side."""
        if not self._counters:
            return True
        if self.peer_pid <= 0 or not gone(self.peer_pid):
            return False
        counters, self._counters = self._counters, []
        _release(c for c in counters if share_count(*c) == 1)
        return True


class LostExports:
    """The exports of lost connections whose peer may still map them, until it is seen gone."""

    def __init__(self, gone: Callable[[int], bool] = process_gone) -> None:
        self._gone = gone
        self._waiting: list[CacheExport] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, export: CacheExport) -> None:
        """A connection with this export was lost (closed already)."""
        if not export.release_for_dead_peer(self._gone):
            self._waiting.append(export)

    def sweep(self) -> None:
        """Count down the shares of every peer gone since (the transport's close: before torch
        checks at exit); the others stay, counted: nothing here may touch a live peer's."""
        self._waiting = [e for e in self._waiting if not e.release_for_dead_peer(self._gone)]


def export_caches(tensors: Sequence[torch.Tensor]) -> CacheExport:
    """One connection's export of every layer's cache tensor: per layer, torch's storage IPC tuple
    (as torch.multiprocessing sends it) and the tensor's offset in its storage; layers that share
    a storage share its one entry (the peer maps each storage once)."""
    shares: dict[int, dict[str, Any]] = {}  # storage address -> its share's entry
    aliases: list[torch.UntypedStorage] = []
    layers = []
    for kv in tensors:
        storage = kv.untyped_storage()
        share = shares.get(storage.data_ptr())
        if share is None:
            whole = torch.empty(0, dtype=torch.uint8, device=kv.device).set_(storage)
            alias = torch.from_dlpack(whole).untyped_storage()
            device, handle, size, offset, ref_handle, ref_offset, event, event_sync = alias._share_cuda_()
            aliases.append(alias)
            share = shares[storage.data_ptr()] = {
                "handle": _b64(handle), "size": size, "offset": offset, "ref_handle": _b64(ref_handle),
                "ref_offset": ref_offset, "event": _b64(event), "event_sync": bool(event_sync),
            }  # fmt: skip
        layers.append({**share, "tensor_offset": kv.storage_offset(), "num_blocks": kv.shape[1]})
    blob = json.dumps({"layers": layers}).encode()
    return CacheExport(blob, aliases, [_counter(share) for share in shares.values()])


def release_export(blob: bytes) -> None:
    """A peer's export this process received and will not map (refused, or unusable here): take
    its counts down, as a mapping would have when it went, so the peer's torch can free the shares."""
    _release(dict.fromkeys(_counter(e) for e in json.loads(blob)["layers"]))


_MAX_PLANS = 256  # copy plans kept per peer: an engine pushes a few dozen groupings at most


@dataclass(eq=False)
class PeerCaches:
    """A receiver's cache tensors, mapped into this process: what direct writes land in."""

    layers: list[torch.Tensor]  # per layer (2, num_blocks, block_size, kv_heads, head_dim), the peer's memory
    # (first layer, the source layers' addresses) -> the copy's plan (kernels.kv_pack.plan_copy)
    _plans: dict[tuple[int, tuple[int, ...]], CopyPlan] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[1]

    def plan(self, first_layer: int, src_layers: Sequence[torch.Tensor]) -> CopyPlan | None:
        """The copy plan from these source layers into ours from first_layer (None without Triton).
        Keyed on the sources' addresses: the engine's caches never move, so a plan made (and its
        tensors checked) for a group is right for every later push of that group."""
        if not triton_available():
            return None
        key = (first_layer, tuple(kv.data_ptr() for kv in src_layers))
        found = self._plans.get(key)
        if found is None:
            found = plan_copy(src_layers, self.layers[first_layer : first_layer + len(src_layers)])
            if len(self._plans) >= _MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = found
        return found

    def close(self) -> None:
        """Drop the mappings (torch closes the IPC handles with the last reference). Only once no
        copy into them is queued: the sender synchronises its copy stream first."""
        self.layers = []
        self._plans = {}  # they hold the first mapped layer too


def open_caches(blob: bytes, layout: KVLayout, device: torch.device) -> PeerCaches:
    """Map a peer's exported caches on `device` (this process's own GPU, whichever GPU holds them:
    the driver maps a peer GPU's memory over NVLink or PCIe). Raises on anything unusable.
    Each share's count goes down exactly once: when the mapping that holds it goes, or here at
    once for a share left unmapped (one of a storage already mapped, or any, when this raises)."""
    entries = json.loads(blob)["layers"]
    held: set[tuple[bytes, int]] = set()  # the shares a mapping of ours holds: its end counts them
    try:
        layers = _map_layers(entries, layout, device, held)
    finally:
        _release(c for c in dict.fromkeys(_counter(e) for e in entries) if c not in held)
    return PeerCaches(layers)


def _map_layers(
    entries: list[dict[str, Any]], layout: KVLayout, device: torch.device, held: set[tuple[bytes, int]]
) -> list[torch.Tensor]:
    if len(entries) != layout.num_layers:
        raise ValueError(f"the peer exported {len(entries)} layers, the layout has {layout.num_layers}")
    dtype = getattr(torch, layout.dtype)
    storages: dict[tuple[str, int], torch.UntypedStorage] = {}  # layers sharing one storage map it once
    layers = []
    torch.cuda.init()
    for e in entries:
        key = (e["handle"], e["offset"])
        storage = storages.get(key)
        if storage is None:
            storage = storages[key] = torch.UntypedStorage._new_shared_cuda(
                device.index if device.index is not None else torch.cuda.current_device(),
                _unb64(e["handle"]), e["size"], e["offset"], _unb64(e["ref_handle"]), e["ref_offset"],
                _unb64(e["event"]), e["event_sync"],
            )  # fmt: skip
            held.add(_counter(e))  # released by this storage's deleter when its last view goes
        shape = (2, int(e["num_blocks"]), layout.block_size, layout.num_kv_heads, layout.head_dim)
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        kv = torch.empty(0, dtype=dtype, device=device).set_(storage, int(e["tensor_offset"]), shape, strides)
        layers.append(kv)
    return layers


def map_peer(address: str, blob: bytes, layout: KVLayout, device: torch.device) -> PeerCaches | None:
    """open_caches for a connection: None (its KV then goes over UCX) when this process cannot map them."""
    try:
        return open_caches(blob, layout, device)
    except Exception as e:
        log.warning("kv direct writes unavailable: KV goes over UCX", peer=address, error=f"{type(e).__name__}: {e}")
        return None


def exportable(tensors: Sequence[torch.Tensor] | None) -> bool:
    return bool(tensors) and all(t.is_cuda for t in tensors or ())
