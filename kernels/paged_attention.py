"""Decode attention over the paged KV cache: the Triton kernel's host wrapper and its torch reference.

One query token per sequence attends to that sequence's cached tokens, which lie in fixed-size
blocks scattered through the cache (engine/kv_layout.py); a block table row lists them in order.
The current token's K and V are already in the cache, so `context_lens` counts it.

`paged_attention_decode` runs the Triton kernel (kernels/_paged_attention_kernel.py) for CUDA
tensors, kernels/paged_attention_cpu.py for CPU ones, and the torch reference otherwise. All
accumulate in float32 and return q's dtype. This module refuses to know how blocks are allocated:
it reads the tables it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels._triton import (
    check_triton_device,
    interpreter_active,
    multiprocessor_count,
    next_power_of_2,
    require_triton,
    triton_available,
)
from kernels.paged_attention_cpu import paged_attention_decode_cpu

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DecodeLaunchConfig:
    """How the Triton kernel splits the work; the defaults are what the wrapper uses.

    The context is cut into partitions (a multiple of block_n tokens each) so that at least
    `programs_per_sm` programs per multiprocessor run even for one sequence; `partition_size`
    forces a size instead (tests use it to exercise the merge). The partition count is derived from
    the block table's width, never from context_lens, so choosing it needs no device sync.
    """

    block_n: int = 64  # tokens per loop step, a power of 2 >= 16
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 2
    max_partitions: int = 256
    partition_size: int | None = None
    dot_fp32: bool = False  # upcast 16-bit operands to float32 before the dots (tf32, exact products)

    def partitions(self, batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> tuple[int, int]:
        """(partition_size, num_partitions) for a launch."""
        if self.partition_size is not None:
            size = _round_up(self.partition_size, self.block_n)
        else:
            wanted = max(1, math.ceil(self.programs_per_sm * num_sms / (batch * num_kv_heads)))
            wanted = min(wanted, self.max_partitions)
            size = _round_up(math.ceil(max_context / wanted), self.block_n)
        return size, math.ceil(max_context / size)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    use_triton: bool | None = None,
    config: DecodeLaunchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's one query token over its cached tokens.

    q: (batch, num_heads, head_dim); k_cache, v_cache: (num_blocks, block_size, num_kv_heads,
    head_dim), q's dtype, innermost dim contiguous; block_tables: (batch, max_blocks_per_seq) int32,
    entries past a sequence's last block are ignored; context_lens: (batch,) int32, each in
    [1, max_blocks_per_seq * block_size] (not checked on the device: that would cost a sync).
    Query head h reads KV head h // (num_heads // num_kv_heads). Returns (batch, num_heads,
    head_dim) in q's dtype — into `out` when given (q's shape and dtype, last dim contiguous; the
    Triton kernel writes it directly, a mixed step's attention output in place). use_triton=None
    picks Triton for CUDA tensors.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, scale)
    if out is not None and (
        out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1
    ):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, contiguous in its last dim")
    if use_triton is None:
        use_triton = q.is_cuda and triton_available()
    if not use_triton:
        if q.device.type == "cpu":
            got = paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, scale)
        else:
            got = paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
        return got if out is None else out.copy_(got)
    config = config or DecodeLaunchConfig()
    return _decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, config, out)


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch decode attention, same contract as paged_attention_decode.

    Gathers every sequence's blocks at once (up to the longest context), then a masked softmax in
    float32 — for a lone request one fused scaled_dot_product_attention instead. The oracle for
    the other paths (CPU tensors take kernels/paged_attention_cpu.py, fewer passes over K/V).
    Memory is batch * longest context * num_kv_heads * head_dim floats for K and for V.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if batch == 0:
        return torch.empty_like(q)
    lens = context_lens.long()
    longest = int(lens.max())
    blocks_used = min(block_tables.shape[1], -(-longest // block_size))
    table = block_tables[:, :blocks_used].long()  # (batch, blocks_used)
    tokens = min(blocks_used * block_size, longest)

    def gather(cache: torch.Tensor) -> torch.Tensor:
        # (batch, blocks_used, block_size, kv_heads, head_dim) -> (batch, kv_heads, tokens, head_dim)
        gathered = cache[table].reshape(batch, blocks_used * block_size, num_kv_heads, head_dim)
        return gathered[:, :tokens].transpose(1, 2).float()

    k, v = gather(k_cache), gather(v_cache)
    if batch == 1:  # no padding to mask: one fused kernel, the fewest ops for a lone request
        out = F.scaled_dot_product_attention(q.float().unsqueeze(2), k, v, scale=scale, enable_gqa=True)
        return out.squeeze(2).to(q.dtype)  # (1, num_heads, head_dim)
    invalid = torch.arange(tokens, device=q.device) >= lens[:, None]  # (batch, tokens)
    # Slots past a context may hold anything, NaN included, and 0 * NaN is NaN: zero them in V.
    v.masked_fill_(invalid[:, None, :, None], 0.0)
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scale  # (batch, kv_heads, group, tokens)
    logits.masked_fill_(invalid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs, v)  # (batch, kv_heads, group, head_dim)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def _decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    config: DecodeLaunchConfig,
    out: torch.Tensor | None,
) -> torch.Tensor:
    require_triton()
    check_triton_device(q, k_cache, v_cache, block_tables, context_lens)
    from kernels._paged_attention_kernel import _decode_partition_kernel, _reduce_partitions_kernel

    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    max_context = block_tables.shape[1] * block_size
    part_size, num_parts = config.partitions(batch, num_kv_heads, max_context, multiprocessor_count(q.device))
    single = num_parts == 1
    # The interpreter multiplies 16-bit dot operands as raw integers (Triton 3.9): upcast there.
    dot_fp32 = config.dot_fp32 or q.dtype == torch.float32 or interpreter_active()
    ieee = q.dtype == torch.float32
    if single:  # the kernel writes out directly and never touches the partition scratch
        part_acc = part_max = part_sum = out
    else:
        rows = (batch, num_heads, num_parts)
        part_acc = torch.empty((*rows, head_dim), dtype=torch.float32, device=q.device)
        part_max = torch.empty(rows, dtype=torch.float32, device=q.device)
        part_sum = torch.empty(rows, dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, next_power_of_2(head_dim))
    _decode_partition_kernel[(batch, num_kv_heads, num_parts)](
        out, part_acc, part_max, part_sum,
        q, k_cache, v_cache, block_tables, context_lens,
        scale * math.log2(math.e), part_size, num_parts,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_N=config.block_n,
        SINGLE_PARTITION=single, DOT_FP32=dot_fp32, IEEE_DOT=ieee,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if not single:
        _reduce_partitions_kernel[(batch, num_heads)](
            out, part_acc, part_max, part_sum, context_lens, part_size, num_parts,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CHUNK=16,
            num_warps=4,
        )  # fmt: skip
    return out


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, num_heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    _, _, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim differs: q has {head_dim}, the cache {cache_head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share one dtype of {_DTYPES}, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(
            f"block_tables and context_lens must be int32, got {block_tables.dtype} and {context_lens.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or block_tables.shape[1] == 0:
        raise ValueError(f"block_tables must be (batch={batch}, >=1), got shape {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be ({batch},), got shape {tuple(context_lens.shape)}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    if context_lens.numel() > 1 and context_lens.stride(0) != 1:
        raise ValueError(f"context_lens must be contiguous, got stride {context_lens.stride()}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
