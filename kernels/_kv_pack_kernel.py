"""Triton kernel that copies whole KV blocks between a layer group's caches and a staging buffer.

Imported only by kernels.kv_pack on the first Triton launch (this module imports triton).

The kernel reads every tensor as machine words (WORD: int64 where block size and alignment allow),
so it knows no dtype: a block is BLOCK_WORDS contiguous words in each of K and V. One launch covers
every layer of a group, however many: the layers arrive as one base pointer (the first layer's)
and a device table of each layer's distance from it in words, which the wrapper builds once per
set of caches and keeps (kv_pack._layer_offsets), so a launch copies nothing to the device first.
A base pointer plus offsets that ALIGN hints divide keeps every address provably 16-byte aligned,
so Triton still emits 16-byte copies; a table of raw pointers would lose that.
A block id outside [0, num_blocks) is skipped, so a bad id can never make the kernel read or write
outside the caches; reporting it is validate_block_ids' job.
"""

from __future__ import annotations

import triton
import triton.language as tl

WORD_TYPES = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}  # by word size in bytes


@triton.jit
def _copy_blocks_kernel(
    staging_ptr,  # (num_layers, 2, n, BLOCK_WORDS) words
    base_ptr,  # the first layer: (2, num_blocks, BLOCK_WORDS) words of staging's dtype
    layer_offsets_ptr,  # (num_layers,) int64: each layer's start minus base_ptr's, in words
    block_ids_ptr,  # (n,) int64
    n,
    num_blocks,
    PACK: tl.constexpr,  # True: caches -> staging; False: staging -> caches
    WORD: tl.constexpr,  # integer type the bytes are moved as
    ALIGN: tl.constexpr,  # words every layer offset is a multiple of
    BLOCK_WORDS: tl.constexpr,
    CHUNK: tl.constexpr,  # words per program, a power of 2
    CHUNKS_PER_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    index = pid // CHUNKS_PER_BLOCK  # which of the n blocks
    chunk = pid % CHUNKS_PER_BLOCK
    layer_kv = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 for K, 1 for V)
    layer_offset = tl.multiple_of(tl.load(layer_offsets_ptr + layer_kv // 2), ALIGN)
    base_ptr = base_ptr.to(tl.pointer_type(WORD), bitcast=True)
    staging_ptr = staging_ptr.to(tl.pointer_type(WORD), bitcast=True)
    block = tl.load(block_ids_ptr + index)
    if (block < 0) | (block >= num_blocks):
        return
    words = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = words < BLOCK_WORDS
    cache_words = base_ptr + layer_offset + ((layer_kv % 2) * num_blocks + block) * BLOCK_WORDS + words
    staging_words = staging_ptr + (layer_kv * n + index) * BLOCK_WORDS + words
    if PACK:
        tl.store(staging_words, tl.load(cache_words, mask=mask), mask=mask)
    else:
        tl.store(cache_words, tl.load(staging_words, mask=mask), mask=mask)


@triton.jit
def _copy_between_kernel(
    src_base_ptr,  # the first source layer: (2, src_num_blocks, BLOCK_WORDS) words
    src_offsets_ptr,  # (num_layers,) int64: each source layer's start minus src_base_ptr's, in words
    src_ids_ptr,  # (n,) int64
    dst_base_ptr,  # the first destination layer (another process's memory, mapped here over CUDA IPC)
    dst_offsets_ptr,
    dst_ids_ptr,
    src_num_blocks,
    dst_num_blocks,
    WORD: tl.constexpr,
    SRC_ALIGN: tl.constexpr,
    DST_ALIGN: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PER_BLOCK: tl.constexpr,
):
    """dst[l][kv, dst_ids[i]] = src[l][kv, src_ids[i]]: block to block, no staging in between."""
    pid = tl.program_id(0)
    index = pid // CHUNKS_PER_BLOCK
    chunk = pid % CHUNKS_PER_BLOCK
    layer_kv = tl.program_id(1).to(tl.int64)
    src_offset = tl.multiple_of(tl.load(src_offsets_ptr + layer_kv // 2), SRC_ALIGN)
    dst_offset = tl.multiple_of(tl.load(dst_offsets_ptr + layer_kv // 2), DST_ALIGN)
    src_base_ptr = src_base_ptr.to(tl.pointer_type(WORD), bitcast=True)
    dst_base_ptr = dst_base_ptr.to(tl.pointer_type(WORD), bitcast=True)
    src_block = tl.load(src_ids_ptr + index)
    dst_block = tl.load(dst_ids_ptr + index)
    if (src_block < 0) | (src_block >= src_num_blocks) | (dst_block < 0) | (dst_block >= dst_num_blocks):
        return
    words = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = words < BLOCK_WORDS
    kv = layer_kv % 2
    src_words = src_base_ptr + src_offset + (kv * src_num_blocks + src_block) * BLOCK_WORDS + words
    dst_words = dst_base_ptr + dst_offset + (kv * dst_num_blocks + dst_block) * BLOCK_WORDS + words
    tl.store(dst_words, tl.load(src_words, mask=mask), mask=mask)
