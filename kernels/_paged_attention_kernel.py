"""Triton kernels of paged decode attention (split-K "flash decoding" with GQA packing).

Imported only by kernels.paged_attention on the first Triton launch (this module imports triton).

Design. One program takes one (sequence, KV head, context partition): it loads the query rows of
every query head that shares the KV head (GQA packing: K and V are read once per group, not once
per query head), walks its partition BLOCK_N tokens at a time, looks each token's cache block up in
the block table, and keeps an online softmax in float32 in the log2 domain. With one partition the
program normalises and writes the output itself; with several, it writes its unnormalised
accumulator, running max and running sum, and `_reduce_partitions_kernel` merges them. The
partition size is a runtime argument (no recompilation as contexts grow); tokens past a sequence's
length are masked, and partitions past it return at once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_partition_kernel(
    out_ptr,  # (batch, num_heads, head_dim), q's dtype; written when SINGLE_PARTITION
    part_acc_ptr,  # (batch, num_heads, num_partitions, head_dim) float32, unnormalised
    part_max_ptr,  # (batch, num_heads, num_partitions) float32, running max of logits * log2(e)
    part_sum_ptr,  # (batch, num_heads, num_partitions) float32, sum of exp2(logit - max)
    q_ptr,  # (batch, num_heads, head_dim)
    k_ptr,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_ptr,  # (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables_ptr,  # (batch, max_blocks_per_seq) int32
    context_lens_ptr,  # (batch,) int32
    qk_scale,  # softmax scale * log2(e)
    partition_size,  # tokens per partition, a multiple of BLOCK_N
    num_partitions,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 (tl.dot's smallest M), power of 2
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # >= 16, power of 2
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # tokens per loop step
    SINGLE_PARTITION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands to float32 (interpreter, or float32 caches)
    IEEE_DOT: tl.constexpr,  # exact float32 products (float32 caches); else tf32 for fp32 dots
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = part * partition_size
    if start >= context_len:
        return
    end = tl.minimum(start + partition_size, context_len)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this group
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )  # (GROUP_PAD, HEAD_DIM_PAD)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq * stride_btb
    for tok0 in range(start, end, BLOCK_N):
        toks = tok0 + tl.arange(0, BLOCK_N)
        tok_mask = toks < end
        block = tl.load(table_row + toks // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        slot = toks % BLOCK_SIZE
        kv_mask = tok_mask[:, None] & dim_mask[None, :]
        k = tl.load(
            k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )  # (BLOCK_N, HEAD_DIM_PAD)
        v = tl.load(
            v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )  # (BLOCK_N, HEAD_DIM_PAD)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(k))
        logits = tl.where(tok_mask[None, :], logits * qk_scale, float("-inf"))  # (GROUP_PAD, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = row_mask[:, None] & dim_mask[None, :]
    if SINGLE_PARTITION:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        slot_index = (seq * NUM_HEADS + heads) * num_partitions + part  # (GROUP_PAD,)
        tl.store(part_acc_ptr + slot_index[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
        tl.store(part_max_ptr + slot_index, m_i, mask=row_mask)
        tl.store(part_sum_ptr + slot_index, l_i, mask=row_mask)


@triton.jit
def _reduce_partitions_kernel(
    out_ptr,  # (batch, num_heads, head_dim), q's dtype
    part_acc_ptr,  # (batch, num_heads, num_partitions, head_dim) float32
    part_max_ptr,  # (batch, num_heads, num_partitions) float32
    part_sum_ptr,  # (batch, num_heads, num_partitions) float32
    context_lens_ptr,  # (batch,) int32
    partition_size,
    num_partitions,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    CHUNK: tl.constexpr,  # partitions merged per loop step
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    used = tl.cdiv(context_len, partition_size)  # partitions this sequence wrote
    base = (seq * NUM_HEADS + head) * num_partitions
    parts = tl.arange(0, CHUNK)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM

    max_seen = tl.full([CHUNK], float("-inf"), tl.float32)
    for p0 in range(0, used, CHUNK):
        m = tl.load(part_max_ptr + base + p0 + parts, mask=p0 + parts < used, other=float("-inf"))
        max_seen = tl.maximum(max_seen, m)
    global_max = tl.max(max_seen, 0)

    acc = tl.zeros([CHUNK, HEAD_DIM_PAD], tl.float32)
    denom = tl.zeros([CHUNK], tl.float32)
    for p0 in range(0, used, CHUNK):
        part_mask = p0 + parts < used
        m = tl.load(part_max_ptr + base + p0 + parts, mask=part_mask, other=float("-inf"))
        s = tl.load(part_sum_ptr + base + p0 + parts, mask=part_mask, other=0.0)
        a = tl.load(
            part_acc_ptr + (base + p0 + parts)[:, None] * HEAD_DIM + dims[None, :],
            mask=part_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )  # (CHUNK, HEAD_DIM_PAD)
        w = tl.exp2(m - global_max)  # 0 for masked partitions
        acc += a * w[:, None]
        denom += s * w
    out = tl.sum(acc, 0) / tl.sum(denom, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)
