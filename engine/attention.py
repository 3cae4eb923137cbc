"""Attention over the paged KV cache for one mixed batch (decodes and prefill chunks).

The batch's tokens are flattened: first every request advancing by one token (decode — and a
one-token prompt), then the prefill chunks. Each layer writes its new K/V into the cache slots
(on CUDA the rotary kernel has written them already: kv_written), then attends: decodes through
the paged-attention kernel (Triton on CUDA; on CPU the compiled C kernel of kernels/cpu_native.py
where it builds, else the fused torch path, its gather planned once per step); prefill chunks on
CUDA all in one Triton launch reading their keys from the cache (kernels/paged_prefill.py), on
CPU each through scaled_dot_product_attention over its cached prefix plus itself. Given `out`,
the kernels write the layer's output there in place (the piecewise graphs' static buffer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from kernels._triton import triton_available
from kernels.cpu_native import NativeDecodeAttention
from kernels.paged_attention import paged_attention_decode
from kernels.paged_attention_cpu import DecodePlan, decode_attention_cpu, plan_decode
from kernels.paged_prefill import paged_prefill

# Not cuDNN, which SDPA picks first on Hopper: its host side cost ~0.6 ms a call on an H100 (one
# per prefill chunk per layer: ~20 ms of a step's launch time), more for every new chunk length.
_CUDA_PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(slots=True)
class PrefillSpan:
    start: int  # first row of this chunk in the flattened batch
    num_new: int  # tokens in the chunk
    num_context: int  # cached prefix + the chunk: keys the chunk attends to
    block_ids: torch.Tensor  # (num_blocks_covering_context,) int64, on the cache's device


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) int64: block_id * block_size + offset of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # (num_decodes, max_blocks) int32
    decode_context_lens: torch.Tensor | None  # (num_decodes,) int32, including the new token
    prefills: list[PrefillSpan]
    # CPU: the compiled decode-attention kernel (kernels/cpu_native.py); None: torch's SDPA path.
    cpu_native: NativeDecodeAttention | None = None
    # CPU: the decodes' plan (the kernel's checked tables, or SDPA's gather), made by the first
    # layer and reused by the others.
    cpu_decode_plan: DecodePlan | None = None
    # CUDA: every prefill chunk in one kernel launch (kernels/paged_prefill.py): per chunk (row0, n,
    # ctx, first entry in prefill_blocks) int64, the chunks' block ids one after another, and the
    # longest n. None: each chunk through _prefill_chunk.
    prefill_info: torch.Tensor | None = None
    prefill_blocks: torch.Tensor | None = None
    prefill_max_new: int = 0


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv_layer: (2, num_blocks, block_size, kv_heads, head_dim); k, v: (num_tokens, kv_heads, head_dim)."""
    flat = kv_layer.view(2, -1, kv_layer.shape[-2], kv_layer.shape[-1])  # (2, num_slots, kv_heads, head_dim)
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def paged_attention(
    q: torch.Tensor,  # (num_tokens, num_heads, head_dim), rotary applied
    k: torch.Tensor,  # (num_tokens, kv_heads, head_dim), rotary applied
    v: torch.Tensor,  # (num_tokens, kv_heads, head_dim)
    kv_layer: torch.Tensor,  # (2, num_blocks, block_size, kv_heads, head_dim)
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # (num_tokens, num_heads, head_dim): written in place when given
    kv_written: bool = False,  # k and v already in the cache (kernels.layer_ops.rotary_split wrote them)
) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
    if not kv_written:
        write_kv(kv_layer, k, v, meta.slot_mapping)
    nd = meta.num_decodes
    if not meta.prefills and out is None:
        return _decode(q, kv_layer, meta, scale, None)
    if out is None:
        out = torch.empty_like(q)
    if nd:
        _decode(q[:nd], kv_layer, meta, scale, out[:nd])  # the kernel writes its rows of out itself
    info, blocks = meta.prefill_info, meta.prefill_blocks
    if q.is_cuda and info is not None and blocks is not None and triton_available():
        # Every chunk at once, its keys read from the cache (its own K and V are written above).
        paged_prefill(q, kv_layer[0], kv_layer[1], info, blocks, scale, meta.prefill_max_new, out)
        return out
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_new)
        out[rows] = _prefill_chunk(q[rows], k[rows], v[rows], kv_layer, span, scale)
    return out


def _decode(
    q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor | None
) -> torch.Tensor:
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    assert tables is not None and lens is not None
    if q.is_cuda:
        return paged_attention_decode(q, kv_layer[0], kv_layer[1], tables, lens, scale, out=out)
    if meta.cpu_decode_plan is None:  # the step's first layer
        meta.cpu_decode_plan = plan_decode(tables, lens, kv_layer.shape[2], meta.cpu_native)
    got = decode_attention_cpu(q, kv_layer, meta.cpu_decode_plan, scale)
    return got if out is None else out.copy_(got)


def _prefill_chunk(
    q: torch.Tensor,  # (n, num_heads, head_dim)
    k: torch.Tensor,  # (n, kv_heads, head_dim)
    v: torch.Tensor,
    kv_layer: torch.Tensor,
    span: PrefillSpan,
    scale: float,
) -> torch.Tensor:
    n, ctx = span.num_new, span.num_context
    if ctx == n:  # no cached prefix: the chunk's own K/V are all the keys
        keys, values, mask, causal = k, v, None, True
    else:
        # index_select copies whole blocks; advanced indexing would copy element by element.
        gathered = kv_layer.index_select(1, span.block_ids)  # (2, nb, block_size, kv_heads, head_dim)
        gathered = gathered.flatten(1, 2)[:, :ctx]  # (2, ctx, kv_heads, head_dim)
        keys, values = gathered[0], gathered[1]
        # Query i sits at position ctx - n + i and sees keys 0 ..= that position: causal aligned to
        # the lower right, which flash attention does without a mask on CUDA.
        mask = causal_lower_right(n, ctx) if q.is_cuda else _lower_right_mask(n, ctx, q.device)
        causal = False
    with sdpa_kernel(_CUDA_PREFILL_BACKENDS) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # (1, num_heads, n, head_dim)
            keys.transpose(0, 1).unsqueeze(0),  # (1, kv_heads, ctx, head_dim)
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )  # (1, num_heads, n, head_dim)
    return out[0].transpose(0, 1)


def _lower_right_mask(n: int, ctx: int, device: torch.device) -> torch.Tensor:
    """(n, ctx) bool: query i (at position ctx - n + i) may see keys 0 ..= its position."""
    q_pos = torch.arange(ctx - n, ctx, device=device)
    return torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]
