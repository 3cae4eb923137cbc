"""Prefill-chunk attention over the paged KV cache: every chunk of a step in one Triton launch.

A chunk of n new tokens continues a sequence whose first ctx - n tokens are cached; its own K and
V are already in the cache too, so every key is read from the cache through the chunk's block
list. Query i sits at position ctx - n + i and sees keys 0 ..= that position. The step's chunks are
described by two int64 tensors the runner uploads once per step (engine/runner.py):

    info    (chunks, 4): first row of the chunk in q / out, n, ctx, first entry of its blocks
    blocks  (sum of block counts,): each chunk's cache blocks, in order, one chunk after another

Why a kernel of our own (issue 15, on an H100 with 8B shapes): SDPA's flash path needed the
prefix gathered out of the cache first (index_select), split the work in two kernels (split-KV
and combine, ~18 µs a 256-token chunk for ~7 µs of FLOPs), returned its output for a copy into
the step's, and cost ~70 µs of host time a call; here one launch per layer for all chunks, no
gather, the output written in place. `paged_prefill_ref` is the plain-torch oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels._triton import check_triton_device, interpreter_active, next_power_of_2, require_triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def paged_prefill(
    q: torch.Tensor,  # (tokens, num_heads, head_dim), the chunks' rows at info's offsets
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    info: torch.Tensor,  # (chunks, 4) int64
    blocks: torch.Tensor,  # (total_blocks,) int64
    scale: float,
    max_new: int,  # the longest chunk's n (sizes the launch: no device sync)
    out: torch.Tensor,  # (tokens, num_heads, head_dim): the chunks' rows are written, no others
) -> torch.Tensor:
    """The Triton kernel (kernels/_paged_prefill_kernel.py) on CUDA tensors (CPU ones under
    TRITON_INTERPRET=1). Values in info and blocks are not checked (that would cost a sync)."""
    _check(q, k_cache, v_cache, info, blocks, scale, out)
    require_triton()
    check_triton_device(q, k_cache, v_cache, info, blocks, out)
    from kernels._paged_prefill_kernel import _prefill_kernel

    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    chunks = info.shape[0]
    if chunks == 0 or max_new == 0:
        return out
    group = num_heads // num_kv_heads
    block_m = max(1, 64 // group)  # ~64 rows a program: tensor-core dots, registers to spare
    dot_fp32 = q.dtype == torch.float32 or interpreter_active()  # the interpreter's 16-bit dots are wrong
    _prefill_kernel[(-(-max_new // block_m), chunks, num_kv_heads)](
        out, q, k_cache, v_cache, info, blocks, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, ROWS=max(16, next_power_of_2(block_m * group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=64, DOT_FP32=dot_fp32, IEEE_DOT=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


def paged_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    info: torch.Tensor,
    blocks: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """paged_prefill in torch ops, chunk by chunk, in float32 (reads info on the host)."""
    block_size = k_cache.shape[1]
    for row0, n, ctx, block0 in info.tolist():
        ids = blocks[block0 : block0 + -(-ctx // block_size)]
        k = k_cache[ids].flatten(0, 1)[:ctx].float()  # (ctx, kv_heads, head_dim)
        v = v_cache[ids].flatten(0, 1)[:ctx].float()
        visible = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - n, ctx, device=q.device)[:, None]
        got = F.scaled_dot_product_attention(
            q[row0 : row0 + n].float().transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=visible, scale=scale, enable_gqa=True,
        )  # fmt: skip
        out[row0 : row0 + n] = got[0].transpose(0, 1).to(out.dtype)
    return out


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    info: torch.Tensor,
    blocks: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "q must be (tokens, heads, head_dim) and k_cache, v_cache (blocks, block_size, kv_heads, head_dim), "
            f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"q's heads ({num_heads}) must be a multiple of the cache's ({num_kv_heads}), same head_dim")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"q, the caches and out must share one dtype of {_DTYPES}")
    if out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    if info.dtype != torch.int64 or info.dim() != 2 or info.shape[1] != 4 or not info.is_contiguous():
        raise ValueError(f"info must be (chunks, 4) int64, contiguous, got {tuple(info.shape)} {info.dtype}")
    if blocks.dtype != torch.int64 or blocks.dim() != 1 or (blocks.numel() > 1 and blocks.stride(0) != 1):
        raise ValueError(f"blocks must be (n,) int64, contiguous, got {tuple(blocks.shape)} {blocks.dtype}")
    for name, t in (("q", q), ("out", out), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")
