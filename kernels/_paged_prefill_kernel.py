"""Triton kernel of prefill-chunk attention over the paged KV cache (causal, GQA-packed).

Imported only by kernels.paged_prefill on the first Triton launch (this module imports triton).

One program takes BLOCK_M query tokens of one chunk and the GROUP query heads that share one KV
head, as BLOCK_M * GROUP rows of one matrix (K and V are read once per group, and the dots are
wide enough for tensor cores even for a short chunk). It walks the chunk's keys — its cached
prefix and itself, already in the cache — BLOCK_N tokens at a time through the chunk's block
list, with an online softmax in float32 in the log2 domain. Query i of a chunk of n new tokens
over ctx keys sits at position ctx - n + i and sees keys 0 ..= that position (causal aligned to
the lower right). Keys past the block's last query are never loaded.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _prefill_kernel(
    out_ptr,  # (tokens, num_heads, head_dim), q's dtype
    q_ptr,  # (tokens, num_heads, head_dim)
    k_ptr,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_ptr,  # (num_blocks, block_size, num_kv_heads, head_dim)
    info_ptr,  # (chunks, 4) int64: first row in q, new tokens, context (prefix + new), first entry in blocks
    blocks_ptr,  # (sum of the chunks' block counts,) int64: each chunk's cache blocks in order
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    GROUP: tl.constexpr,  # query heads per KV head
    ROWS: tl.constexpr,  # BLOCK_M * GROUP rounded up to a power of 2 (>= 16)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # >= 16, power of 2
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # query tokens per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    DOT_FP32: tl.constexpr,  # upcast dot operands to float32 (interpreter, or float32 caches)
    IEEE_DOT: tl.constexpr,  # exact float32 products (float32 caches)
):
    chunk = tl.program_id(1)
    kv_head = tl.program_id(2)
    row0 = tl.load(info_ptr + chunk * 4)
    num_new = tl.load(info_ptr + chunk * 4 + 1)
    context = tl.load(info_ptr + chunk * 4 + 2)
    block0 = tl.load(info_ptr + chunk * 4 + 3)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= num_new:
        return

    r = tl.arange(0, ROWS)
    tok = m0 + r // GROUP  # the chunk's token of each row
    head = kv_head * GROUP + r % GROUP
    row_mask = (r < BLOCK_M * GROUP) & (tok < num_new)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q_at = q_ptr + (row0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_at, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    pos = context - num_new + tok  # each row's position: it sees keys 0 ..= pos
    end = tl.minimum(context, context - num_new + m0 + BLOCK_M)  # keys the block's last query sees

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
    for key0 in range(0, end, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        key_mask = keys < end
        block = tl.load(blocks_ptr + block0 + keys // BLOCK_SIZE, mask=key_mask, other=0)
        slot = keys % BLOCK_SIZE
        kv_mask = key_mask[:, None] & dim_mask[None, :]
        k = tl.load(
            k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )  # (BLOCK_N, HEAD_DIM_PAD)
        v = tl.load(
            v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(k))
        visible = (keys[None, :] <= pos[:, None]) & key_mask[None, :]
        logits = tl.where(visible, logits * qk_scale, float("-inf"))  # (ROWS, BLOCK_N)
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

    out = acc / l_i[:, None]
    out_at = out_ptr + (row0 + tok)[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
