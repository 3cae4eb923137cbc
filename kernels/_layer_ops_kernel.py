"""Triton kernels of a decoder layer's elementwise work: RMSNorm (with the residual add fused),
rotary on q and k (with the q/k/v split), SiLU-and-multiply.

Imported only by kernels.layer_ops on the first Triton launch (this module imports triton).

Each kernel rounds to the output dtype wherever the torch reference (engine/model.py) rounds, so
that in bf16 it computes what the reference computes; only the order of a float32 sum (the
norm's mean of squares) and the float32 exp of SiLU may differ from torch's in the last bits.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round(x, like):
    """x (float32) rounded to like's dtype, as float32: what torch's cast rounds to (to nearest,
    ties to even). bf16 by the bits, since Triton's interpreter truncates its bf16 casts."""
    if like.dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(like.dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # (rows, dim): the normalised rows, x's dtype
    res_out_ptr,  # (rows, dim): x + residual, when HAS_RESIDUAL (may be residual_ptr: in place)
    x_ptr,  # (rows, dim)
    res_ptr,  # (rows, dim), when HAS_RESIDUAL
    w_ptr,  # (dim,), x's dtype
    eps,
    dim,
    stride_out,
    stride_res_out,
    stride_x,
    stride_res,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # >= dim, power of 2
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = _round(x.to(tl.float32) + r.to(tl.float32), x).to(x.dtype)  # the reference adds in x's dtype
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / dim + eps)
    normed = _round(x32 * rstd, x)  # rounded to x's dtype, then scaled
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, _round(normed * w, x).to(x.dtype), mask=mask)


@triton.jit
def _rotary_split_kernel(
    q_ptr,  # (tokens, num_heads, head_dim), rotary applied
    k_ptr,  # (tokens, num_kv_heads, head_dim), rotary applied
    v_ptr,  # (tokens, num_kv_heads, head_dim)
    qkv_ptr,  # (tokens, (num_heads + 2 * num_kv_heads) * head_dim): the fused projection's output
    cos_ptr,  # (tokens, head_dim)
    sin_ptr,  # (tokens, head_dim), first half negated (engine.model.Rotary)
    k_cache_ptr,  # (num_slots, num_kv_heads, head_dim): the layer's K cache, when WRITE_CACHE
    v_cache_ptr,  # (num_slots, num_kv_heads, head_dim): its V cache
    slots_ptr,  # (tokens,) int64: each token's cache slot; negative: not written (padding rows)
    stride_cache_slot,
    stride_cache_head,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_qkv,
    stride_cos,
    stride_sin,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # power of 2
    BLOCK_H: tl.constexpr,  # heads per program
    WRITE_CACHE: tl.constexpr,  # also write k and v into the cache slots
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # over q, k and v heads in turn
    dims = tl.arange(0, HEAD_DIM_PAD)
    half: tl.constexpr = HEAD_DIM // 2
    dim_mask = dims < HEAD_DIM
    total: tl.constexpr = NUM_HEADS + 2 * NUM_KV_HEADS
    mask = (heads < total)[:, None] & dim_mask[None, :]
    row = qkv_ptr + tok * stride_qkv + heads[:, None] * HEAD_DIM
    x = tl.load(row + dims[None, :], mask=mask, other=0.0)
    partner = tl.where(dims < half, dims + half, dims - half)  # rotate-half: the other half's element
    x_rot = tl.load(row + partner[None, :], mask=mask, other=0.0)
    c = tl.load(cos_ptr + tok * stride_cos + dims, mask=dim_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + tok * stride_sin + dims, mask=dim_mask, other=0.0).to(tl.float32)
    dt = x.dtype
    # x * cos + roll(x) * signed_sin, each product and the sum rounded as the reference rounds them.
    a = _round(x.to(tl.float32) * c[None, :], x)
    b = _round(x_rot.to(tl.float32) * s[None, :], x)
    rotated = _round(a + b, x).to(dt)
    is_q = heads < NUM_HEADS
    is_k = (heads >= NUM_HEADS) & (heads < NUM_HEADS + NUM_KV_HEADS)
    is_v = (heads >= NUM_HEADS + NUM_KV_HEADS) & (heads < total)
    qh = tl.where(is_q, heads, 0)
    kh = tl.where(is_k, heads - NUM_HEADS, 0)
    vh = tl.where(is_v, heads - NUM_HEADS - NUM_KV_HEADS, 0)
    tl.store(q_ptr + tok * stride_q_t + qh[:, None] * stride_q_h + dims[None, :], rotated, mask=mask & is_q[:, None])
    tl.store(k_ptr + tok * stride_k_t + kh[:, None] * stride_k_h + dims[None, :], rotated, mask=mask & is_k[:, None])
    tl.store(v_ptr + tok * stride_v_t + vh[:, None] * stride_v_h + dims[None, :], x, mask=mask & is_v[:, None])
    if WRITE_CACHE:
        slot = tl.load(slots_ptr + tok)
        if slot >= 0:
            k_at = k_cache_ptr + slot * stride_cache_slot + kh[:, None] * stride_cache_head + dims[None, :]
            v_at = v_cache_ptr + slot * stride_cache_slot + vh[:, None] * stride_cache_head + dims[None, :]
            tl.store(k_at, rotated, mask=mask & is_k[:, None])
            tl.store(v_at, x, mask=mask & is_v[:, None])


@triton.jit
def _silu_mul_kernel(
    out_ptr,  # (rows, width)
    x_ptr,  # (rows, 2 * width): gate then up
    width,
    stride_out,
    stride_x,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), gate)  # F.silu rounds to x's dtype
    tl.store(out_ptr + row * stride_out + cols, _round(silu * up.to(tl.float32), gate).to(gate.dtype), mask=mask)
