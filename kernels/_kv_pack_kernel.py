"""Triton kernel that copies whole KV blocks between a layer group's caches and a staging buffer.

Imported only by kernels.kv_pack on the first Triton launch (this module imports triton).

The kernel reads every tensor as machine words (WORD: int64 where block size and alignment allow),
so it knows no dtype: a block is BLOCK_WORDS contiguous words in each of K and V. The layers of one launch
arrive as up to MAX_LAYERS pointer arguments (passed by value: no pointer table to copy to the device
per call, and Triton still sees each pointer's 16-byte alignment, so copies stay 16 bytes wide).
A block id outside [0, num_blocks) is skipped, so a bad id can never make the kernel read or write
outside the caches; reporting it is validate_block_ids' job.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_LAYERS = 8
WORD_TYPES = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}  # by word size in bytes


@triton.jit
def _pick_layer(layer, p0, p1, p2, p3, p4, p5, p6, p7):
    return tl.where(
        layer < 4,
        tl.where(layer < 2, tl.where(layer == 0, p0, p1), tl.where(layer == 2, p2, p3)),
        tl.where(layer < 6, tl.where(layer == 4, p4, p5), tl.where(layer == 6, p6, p7)),
    )


@triton.jit
def _copy_blocks_kernel(
    staging_ptr,  # (num_layers, 2, n, BLOCK_WORDS) words
    layer0_ptr,  # (2, num_blocks, BLOCK_WORDS) words each, staging's dtype; unused slots repeat layer 0
    layer1_ptr,
    layer2_ptr,
    layer3_ptr,
    layer4_ptr,
    layer5_ptr,
    layer6_ptr,
    layer7_ptr,
    block_ids_ptr,  # (n,) int64
    n,
    num_blocks,
    PACK: tl.constexpr,  # True: caches -> staging; False: staging -> caches
    WORD: tl.constexpr,  # integer type the bytes are moved as
    BLOCK_WORDS: tl.constexpr,
    CHUNK: tl.constexpr,  # words per program, a power of 2
    CHUNKS_PER_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    index = pid // CHUNKS_PER_BLOCK  # which of the n blocks
    chunk = pid % CHUNKS_PER_BLOCK
    layer_kv = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 for K, 1 for V)
    layer_ptr = _pick_layer(
        layer_kv // 2,
        layer0_ptr,
        layer1_ptr,
        layer2_ptr,
        layer3_ptr,
        layer4_ptr,
        layer5_ptr,
        layer6_ptr,
        layer7_ptr,
    )
    layer_ptr = layer_ptr.to(tl.pointer_type(WORD), bitcast=True)
    staging_ptr = staging_ptr.to(tl.pointer_type(WORD), bitcast=True)
    block = tl.load(block_ids_ptr + index)
    if (block < 0) | (block >= num_blocks):
        return
    words = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = words < BLOCK_WORDS
    cache_words = layer_ptr + ((layer_kv % 2) * num_blocks + block) * BLOCK_WORDS + words
    staging_words = staging_ptr + (layer_kv * n + index) * BLOCK_WORDS + words
    if PACK:
        tl.store(staging_words, tl.load(cache_words, mask=mask), mask=mask)
    else:
        tl.store(cache_words, tl.load(staging_words, mask=mask), mask=mask)
