"""Decode attention over the paged KV cache on CPU, in plain torch: the production CPU path.

Same contract as kernels.paged_attention.paged_attention_decode. Where the reference
(`paged_attention_decode_ref`) takes five passes over the gathered keys and values (an
element-wise gather, a float32 copy, the transposed copy a batched matmul makes, the masking,
the matmul), this path takes two: whole blocks are copied out with `index_select` (rows of
block_size * kv_heads * head_dim contiguous elements, a memcpy each), then one fused
`scaled_dot_product_attention` (torch's CPU flash kernel, float32 accumulation, a boolean mask
for the padded tail) reads them once.

The mask alone is not enough where a masked slot holds NaN or inf: a NaN key makes its score NaN
before the mask applies, and a masked value gets weight 0, but 0 * NaN is NaN. The slots past a
context are stale values of a block's previous owner or of block 0 (the tables' padding), which
a working model only ever fills with finite numbers; so the fast path trusts them, checks the
small output for NaN, and only if one appears recomputes with the
tails of K and V zeroed.

What depends only on the batch (the block ids to copy, the longest context, the mask) is worked
out once per step in a `DecodePlan` and reused by every layer; `decode_attention_cpu` then copies
a layer's keys and values in one `index_select` over the layer's whole (2, blocks, ...) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.cpu_native import NativeDecodeAttention


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """What every layer's decode attention of one step shares (plan_decode)."""

    block_ids: torch.Tensor  # (batch * blocks_used,) int64: each row's first blocks_used blocks, row by row
    batch: int
    tokens: int  # the longest context: keys per row after the gather
    mask: torch.Tensor | None  # (batch, 1, 1, tokens) bool, True where a key is in its row's context; None at batch 1
    # The compiled kernel (kernels/cpu_native.py) with the step's tables, checked once here; None: SDPA.
    native: NativeDecodeAttention | None = None
    tables: torch.Tensor | None = None  # (batch, max_blocks) int32, contiguous
    lens: torch.Tensor | None = None  # (batch,) int32, contiguous
    max_block_id: int = -1  # the highest block id the tables reach, checked against each layer's cache


def plan_decode(
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    native: NativeDecodeAttention | None = None,
) -> DecodePlan:
    """block_tables: (batch, max_blocks) int32; context_lens: (batch,) int32, CPU tensors. With
    `native`, the layers run the compiled kernel over the cache's blocks (no gather, no mask)."""
    batch = block_tables.shape[0]
    lens = context_lens.long()
    longest = int(lens.max()) if batch else 0
    if native is not None and batch and _tables_valid(block_tables, lens, block_size):
        tables = block_tables.to(torch.int32).contiguous()
        used = -(-longest // block_size)
        return DecodePlan(
            block_ids=tables.new_empty(0), batch=batch, tokens=longest, mask=None, native=native,
            tables=tables, lens=context_lens.to(torch.int32).contiguous(), max_block_id=int(tables[:, :used].max()),
        )  # fmt: skip
    used = min(block_tables.shape[1], -(-longest // block_size))
    ids = block_tables[:, :used].reshape(-1).long()
    mask = None
    if batch > 1:  # one sequence has no padding to mask
        valid = torch.arange(longest, device=lens.device) < lens[:, None]  # (batch, longest)
        mask = valid[:, None, None, :]  # broadcast over KV heads and the group's queries
    return DecodePlan(ids, batch, longest, mask)


def decode_attention_cpu(
    q: torch.Tensor,  # (batch, num_heads, head_dim)
    kv_layer: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:  # (batch, num_heads, head_dim), q's dtype
    """paged_attention_decode_cpu for one layer of a planned step: K and V copied in one go."""
    if plan.batch == 0:
        return torch.empty_like(q)
    if plan.native is not None and plan.max_block_id < kv_layer.shape[1] and plan.native.supports(q, kv_layer):
        assert plan.tables is not None and plan.lens is not None
        return plan.native(q, kv_layer, plan.tables, plan.lens, scale)
    if plan.native is not None:  # a layer the kernel cannot take: plan the gather for SDPA
        assert plan.tables is not None and plan.lens is not None
        plan = plan_decode(plan.tables, plan.lens, kv_layer.shape[2])
    _, _, block_size, num_kv_heads, head_dim = kv_layer.shape
    blocks = kv_layer.index_select(1, plan.block_ids)  # (2, batch * used, block_size, kv_heads, head_dim)
    per_seq = blocks.view(2, plan.batch, -1, num_kv_heads, head_dim)[:, :, : plan.tokens].transpose(2, 3)
    return _attend(q, per_seq[0], per_seq[1], plan.mask, scale)


def paged_attention_decode_cpu(
    q: torch.Tensor,  # (batch, num_heads, head_dim)
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (batch, max_blocks) int32
    context_lens: torch.Tensor,  # (batch,) int32
    scale: float,
) -> torch.Tensor:  # (batch, num_heads, head_dim), q's dtype
    if q.shape[0] == 0:
        return torch.empty_like(q)
    plan = plan_decode(block_tables, context_lens, k_cache.shape[1])
    return _attend(q, _gather(k_cache, plan), _gather(v_cache, plan), plan.mask, scale)


def _tables_valid(block_tables: torch.Tensor, lens: torch.Tensor, block_size: int) -> bool:
    """Every context fits its table row and no id is negative: what the kernel reads unchecked."""
    if int(lens.min()) < 0 or int(lens.max()) > block_tables.shape[1] * block_size:
        return False
    return block_tables.numel() == 0 or int(block_tables.min()) >= 0


def _attend(
    q: torch.Tensor,  # (batch, num_heads, head_dim)
    k: torch.Tensor,  # (batch, kv_heads, tokens, head_dim)
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    # The query heads that share a KV head are that head's queries: one (b, kv head) pair reads
    # its keys once for the whole group (enable_gqa would read them once per query head, and in
    # bfloat16 took a path ~4x slower).
    query = q.view(batch, k.shape[1], num_heads // k.shape[1], head_dim)
    if mask is None:  # one sequence, no padding: nothing to mask
        return F.scaled_dot_product_attention(query, k, v, scale=scale).view(batch, num_heads, head_dim)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    if bool(out.isnan().any()):  # a non-finite value in a masked slot: zero the tails and redo
        tail = ~mask.transpose(-1, -2)  # (batch, 1, longest, 1)
        k, v = k.masked_fill(tail, 0.0), v.masked_fill(tail, 0.0)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.view(batch, num_heads, head_dim)


def _gather(cache: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    """The first `plan.tokens` slots of every row's blocks: (batch, kv_heads, tokens, head_dim), a
    view of one contiguous copy (SDPA reads strided operands)."""
    _, _, num_kv_heads, head_dim = cache.shape
    blocks = cache.index_select(0, plan.block_ids)  # (batch * used, block_size, kv_heads, head_dim), whole blocks
    per_seq = blocks.view(plan.batch, -1, num_kv_heads, head_dim)[:, : plan.tokens]
    return per_seq.transpose(1, 2)
