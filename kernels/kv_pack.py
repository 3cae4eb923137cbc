"""Gather a request's scattered KV blocks into one contiguous staging buffer, and scatter them back.

KV moves between workers over UCX, where large messages are fast and small ones slow
(../shared/DESIGN.md §4), so the sender packs a request's blocks for a layer group into one staging
buffer and the receiver unpacks the buffer into its own blocks:

    kv_layers[l]  # (2, num_blocks, block_size, num_kv_heads, head_dim); [0] is K, [1] is V
    staging       # (num_layers, 2, n, block_size, num_kv_heads, head_dim), contiguous
    staging[l, kv, i] == kv_layers[l][kv, block_ids[i]]

On CUDA tensors a Triton kernel copies whole blocks as machine words (any dtype), one launch for
all the layers of a call (kernels/_kv_pack_kernel.py); elsewhere index_select / index_copy_ do it, which is also the
CPU production path. This module checks shapes, dtypes and devices but not block id values on the
hot path (that would cost a device sync per call): the receiver validates a ticket's ids once with
validate_block_ids, and the kernel skips any id outside the pool, so it never touches memory outside
the caches and the staging buffer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from kernels._triton import check_triton_device, next_power_of_2, require_triton, triton_available

log = structlog.get_logger(__name__)

_CHUNK_BYTES = 8192  # bytes one program copies
_MAX_TABLES = 256
_TABLES_LOCK = threading.Lock()
_TABLES: dict[tuple[torch.device, int, tuple[int, ...]], tuple[torch.Tensor, int]] = {}  # see _layer_offsets


def pack_blocks(
    kv_layers: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    out: torch.Tensor,
    *,
    use_triton: bool | None = None,
) -> None:
    """out[l, kv, i] = kv_layers[l][kv, block_ids[i]]. block_ids: (n,) int64 on the layers' device."""
    _check(kv_layers, block_ids, out, "out")
    if _pick_triton(out, use_triton):
        _copy_triton(out, kv_layers, block_ids, pack=True)
    else:
        pack_blocks_ref(kv_layers, block_ids, out)


def unpack_blocks(
    staging: torch.Tensor,
    kv_layers: Sequence[torch.Tensor],
    block_ids: torch.Tensor,
    *,
    use_triton: bool | None = None,
) -> None:
    """kv_layers[l][kv, block_ids[i]] = staging[l, kv, i]; the inverse of pack_blocks.

    block_ids must be distinct and inside the pool: check a ticket's ids once with validate_block_ids.
    """
    _check(kv_layers, block_ids, staging, "staging")
    if _pick_triton(staging, use_triton):
        _copy_triton(staging, kv_layers, block_ids, pack=False)
    else:
        unpack_blocks_ref(staging, kv_layers, block_ids)


def copy_blocks(
    src_layers: Sequence[torch.Tensor],
    src_ids: torch.Tensor,
    dst_layers: Sequence[torch.Tensor],
    dst_ids: torch.Tensor,
    *,
    use_triton: bool | None = None,
) -> None:
    """dst_layers[l][kv, dst_ids[i]] = src_layers[l][kv, src_ids[i]], block to block with no staging
    buffer between: a direct write into another worker's cache mapped over CUDA IPC (kvtransfer).

    Both pools have the same block shape and dtype but may differ in size; the ids must be distinct
    and inside their pools (validate_block_ids), as for unpack_blocks. A caller that copies between
    the same layer groups again and again plans once (plan_copy) and launches with launch_copy: the
    checks and the layer tables cost ~1 µs a tensor, which adds up on a transfer's critical path.
    """
    _check_pair(src_layers, src_ids, dst_layers, dst_ids)
    if use_triton is None:
        use_triton = src_ids.is_cuda and triton_available()
    if use_triton:
        check_triton_device(src_ids, dst_ids)
        launch_copy(plan_copy(src_layers, dst_layers), src_ids, dst_ids)
    else:
        copy_blocks_ref(src_layers, src_ids, dst_layers, dst_ids)


def copy_blocks_ref(
    src_layers: Sequence[torch.Tensor], src_ids: torch.Tensor, dst_layers: Sequence[torch.Tensor], dst_ids: torch.Tensor
) -> None:
    """Torch reference of copy_blocks: a gather and a scatter per layer (through a temporary)."""
    for src, dst in zip(src_layers, dst_layers, strict=True):
        dst.index_copy_(1, dst_ids, src.index_select(1, src_ids))


def pack_blocks_ref(kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor) -> None:
    """Torch reference of pack_blocks: one index_select per layer, straight into out."""
    for layer, kv in enumerate(kv_layers):
        torch.index_select(kv, 1, block_ids, out=out[layer])


def unpack_blocks_ref(staging: torch.Tensor, kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor) -> None:
    """Torch reference of unpack_blocks: one index_copy_ per layer, straight from staging."""
    for layer, kv in enumerate(kv_layers):
        kv.index_copy_(1, block_ids, staging[layer])


def validate_block_ids(block_ids: torch.Tensor, num_blocks: int) -> None:
    """ValueError unless block_ids is a 1-D int64 tensor of distinct ids in [0, num_blocks).

    Reads the ids back to the host (a device sync on CUDA): call it once per ticket, not per layer.
    """
    if block_ids.dim() != 1 or block_ids.dtype != torch.int64:
        raise ValueError(f"block_ids must be a 1-D int64 tensor, got {block_ids.dtype} {tuple(block_ids.shape)}")
    if block_ids.numel() == 0:
        return
    ids = block_ids.cpu()
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_blocks:
        raise ValueError(f"block ids must lie in [0, {num_blocks}), got min {low} and max {high}")
    repeats = ids.numel() - ids.unique().numel()
    if repeats:
        raise ValueError(f"block ids must be distinct, got {repeats} repeats")


def _pick_triton(staging: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is None:
        return staging.is_cuda and triton_available()
    return use_triton


def _copy_triton(staging: torch.Tensor, kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, pack: bool) -> None:
    require_triton()
    check_triton_device(staging, block_ids, *kv_layers)
    from kernels._kv_pack_kernel import WORD_TYPES, _copy_blocks_kernel

    n = block_ids.numel()
    if n == 0:
        return
    _, num_blocks, *block_shape = kv_layers[0].shape
    block_bytes = staging.element_size() * block_shape[0] * block_shape[1] * block_shape[2]
    pointers = tuple(kv.data_ptr() for kv in kv_layers)
    word_bytes = next(
        size
        for size in (8, 4, 2, 1)
        if block_bytes % size == 0 and staging.data_ptr() % size == 0 and all(p % size == 0 for p in pointers)
    )
    offsets, align = _layer_offsets(pointers, word_bytes, kv_layers[0].device)
    block_words = block_bytes // word_bytes
    chunk = min(next_power_of_2(block_words), _CHUNK_BYTES // word_bytes)
    chunks_per_block = -(-block_words // chunk)
    _copy_blocks_kernel[(n * chunks_per_block, 2 * len(kv_layers))](
        staging, kv_layers[0], offsets, block_ids, n, num_blocks,
        PACK=pack, WORD=WORD_TYPES[word_bytes], ALIGN=align, BLOCK_WORDS=block_words, CHUNK=chunk,
        CHUNKS_PER_BLOCK=chunks_per_block, num_warps=4,
    )  # fmt: skip


@dataclass(slots=True)
class CopyPlan:
    """Everything a block-to-block copy between two layer groups needs but the ids, worked out once
    (plan_copy): caches never move, so a direct writer reuses one per group of layers and peer."""

    src_base: torch.Tensor  # the first layer of each side: the kernel's base pointers
    dst_base: torch.Tensor
    src_offsets: torch.Tensor  # each layer's distance from its base, in words (on the device)
    dst_offsets: torch.Tensor
    src_align: int
    dst_align: int
    word_bytes: int
    block_words: int
    chunk: int
    chunks_per_block: int
    num_layers: int
    # After the first launch, the kernel Triton compiled for it: launched directly from then on
    # (None: not yet, or the interpreter; False: a direct launch failed once, Triton's JIT launches).
    compiled: Any = None


def plan_copy(src_layers: Sequence[torch.Tensor], dst_layers: Sequence[torch.Tensor]) -> CopyPlan:
    """The Triton copy's launch parameters for these layer groups, after checking them (not the ids)."""
    require_triton()
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"{len(src_layers)} source layers but {len(dst_layers)} destination layers")
    src, dst = src_layers[0], dst_layers[0]
    ids = torch.empty(0, dtype=torch.int64, device=src.device)  # the checks' stand-in: ids are the launch's
    _check_pair(src_layers, ids, dst_layers, ids)
    check_triton_device(*src_layers, *dst_layers)
    _, _, *block_shape = src.shape
    block_bytes = src.element_size() * block_shape[0] * block_shape[1] * block_shape[2]
    src_pointers = tuple(kv.data_ptr() for kv in src_layers)
    dst_pointers = tuple(kv.data_ptr() for kv in dst_layers)
    word_bytes = next(
        size
        for size in (8, 4, 2, 1)
        if block_bytes % size == 0 and all(p % size == 0 for p in src_pointers + dst_pointers)
    )
    src_offsets, src_align = _layer_offsets(src_pointers, word_bytes, src.device)
    dst_offsets, dst_align = _layer_offsets(dst_pointers, word_bytes, dst.device)
    block_words = block_bytes // word_bytes
    chunk = min(next_power_of_2(block_words), _CHUNK_BYTES // word_bytes)
    return CopyPlan(
        src, dst, src_offsets, dst_offsets, src_align, dst_align, word_bytes, block_words, chunk,
        -(-block_words // chunk), len(src_layers),
    )  # fmt: skip


def launch_copy(
    plan: CopyPlan, src_ids: torch.Tensor, dst_ids: torch.Tensor, stream: torch.cuda.Stream | None = None
) -> None:
    """copy_blocks with a plan: one launch on `stream` (default: the current one), nothing checked or
    built (the ids must be n int64 on the device, distinct and inside their pools, as for copy_blocks).

    Triton's JIT launch binds and specialises every argument again on each call (tens of µs on a
    direct write's critical path); every argument it specialises on but the ids is the plan's, so
    after the first launch the plan's compiled kernel is launched straight away, with the same
    arguments in the same order as the JIT passes them, while the ids stay 16-byte aligned as then
    (fresh device tensors always are)."""
    from kernels._kv_pack_kernel import WORD_TYPES, _copy_between_kernel

    n = src_ids.numel()
    if n == 0:
        return
    grid = (n * plan.chunks_per_block, 2 * plan.num_layers, 1)
    args = (
        plan.src_base, plan.src_offsets, src_ids, plan.dst_base, plan.dst_offsets, dst_ids, plan.src_base.shape[1],
        plan.dst_base.shape[1], WORD_TYPES[plan.word_bytes], plan.src_align, plan.dst_align, plan.block_words,
        plan.chunk, plan.chunks_per_block,
    )  # fmt: skip
    aligned = src_ids.data_ptr() % 16 == 0 and dst_ids.data_ptr() % 16 == 0
    if plan.compiled and aligned:
        raw = (stream if stream is not None else torch.cuda.current_stream(src_ids.device)).cuda_stream
        # The compiled kernel launches in the current device's context, which the caller's thread
        # need not have set to the ids' (the JIT launch's stream switch sets it).
        with torch.cuda.device(src_ids.device):
            try:
                plan.compiled[grid](*args, stream=raw)
                return
            except (TypeError, ValueError, AttributeError) as e:
                # Another Triton's launcher convention (the call's signature): its JIT launches from
                # now on. A CUDA error (an illegal address) is raised, never retried as a JIT launch.
                log.warning("direct Triton launch failed: using the JIT launch", error=f"{type(e).__name__}: {e}")
                plan.compiled = False
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        compiled = _copy_between_kernel[grid](*args, num_warps=4)
    if plan.compiled is None and aligned and hasattr(compiled, "__getitem__"):
        plan.compiled = compiled


def _layer_offsets(pointers: tuple[int, ...], word_bytes: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The kernel's layer table for caches at these addresses, on their device: each layer's start
    minus the first's, in words, and the largest power of two (up to 16 bytes' worth) dividing them all.

    Kept per address set: an engine's caches never move, so after the first message of each
    layer group a launch neither builds nor copies anything. A table stays right for whatever
    tensors later occupy the same addresses, since it holds only the addresses' differences.
    """
    key = (device, word_bytes, pointers)
    found = _TABLES.get(key)
    if found is not None:
        return found
    words = [(p - pointers[0]) // word_bytes for p in pointers]
    widest = 16 // word_bytes  # words in 16 bytes: Triton's widest copy
    align = next(a for a in (widest, widest // 2, widest // 4, widest // 8, 1) if a and all(w % a == 0 for w in words))
    table = torch.tensor(words, dtype=torch.int64)
    if device.type == "cuda":
        # On a stream of its own, waited for here: a copy on the current stream would wait for the
        # engine's queued step, and the table may next be used on another thread's stream.
        side = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            table = table.pin_memory().to(device, non_blocking=True)
        side.synchronize()
    with _TABLES_LOCK:  # the engine thread packs while the transport's loop unpacks
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))  # the oldest: a worker has a few hundred groups at most
        _TABLES[key] = (table, align)
    return table, align


def _check(kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor, staging: torch.Tensor, name: str) -> None:
    _check_layers(kv_layers, block_ids)
    first = kv_layers[0]
    want = (len(kv_layers), 2, block_ids.numel(), *first.shape[2:])
    if tuple(staging.shape) != want or staging.dtype != first.dtype or staging.device != first.device:
        raise ValueError(
            f"{name} must be {first.dtype} {want} on {first.device}, got {staging.dtype} "
            f"{tuple(staging.shape)} on {staging.device}"
        )
    if not staging.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_layers(kv_layers: Sequence[torch.Tensor], block_ids: torch.Tensor) -> None:
    if len(kv_layers) == 0:
        raise ValueError("kv_layers is empty: pass the layer group's KV tensors")
    first = kv_layers[0]
    if first.dim() != 5 or first.shape[0] != 2:
        raise ValueError(
            f"each KV layer must be (2, num_blocks, block_size, num_kv_heads, head_dim), got {tuple(first.shape)}"
        )
    for i, kv in enumerate(kv_layers):
        if kv.shape != first.shape or kv.dtype != first.dtype or kv.device != first.device:
            raise ValueError(
                f"kv_layers[{i}] is {kv.dtype} {tuple(kv.shape)} on {kv.device}; kv_layers[0] is "
                f"{first.dtype} {tuple(first.shape)} on {first.device}: a group must match"
            )
        if not kv.is_contiguous():
            raise ValueError(f"kv_layers[{i}] must be contiguous")
    if block_ids.dim() != 1 or block_ids.dtype != torch.int64 or block_ids.device != first.device:
        raise ValueError(
            f"block_ids must be a 1-D int64 tensor on {first.device}, got {block_ids.dtype} "
            f"{tuple(block_ids.shape)} on {block_ids.device}"
        )
    if block_ids.numel() > 1 and block_ids.stride(0) != 1:
        raise ValueError("block_ids must be contiguous")


def _check_pair(
    src_layers: Sequence[torch.Tensor], src_ids: torch.Tensor, dst_layers: Sequence[torch.Tensor], dst_ids: torch.Tensor
) -> None:
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"{len(src_layers)} source layers but {len(dst_layers)} destination layers")
    if src_ids.shape != dst_ids.shape:
        raise ValueError(f"{src_ids.numel()} source block ids but {dst_ids.numel()} destination block ids")
    _check_layers(src_layers, src_ids)
    _check_layers(dst_layers, dst_ids)
    src, dst = src_layers[0], dst_layers[0]
    if src.shape[2:] != dst.shape[2:] or src.dtype != dst.dtype or src.device != dst.device:
        raise ValueError(
            f"source blocks are {src.dtype} {tuple(src.shape[2:])} on {src.device}, destination blocks "
            f"{dst.dtype} {tuple(dst.shape[2:])} on {dst.device}: they must match"
        )
