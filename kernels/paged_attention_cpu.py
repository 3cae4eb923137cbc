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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention_decode_cpu(
    q: torch.Tensor,  # (batch, num_heads, head_dim)
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (batch, max_blocks) int32
    context_lens: torch.Tensor,  # (batch,) int32
    scale: float,
) -> torch.Tensor:  # (batch, num_heads, head_dim), q's dtype
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return torch.empty_like(q)
    num_kv_heads = k_cache.shape[2]
    lens = context_lens.long()
    longest = int(lens.max())
    k, v = _gather(k_cache, block_tables, longest), _gather(v_cache, block_tables, longest)
    # The query heads that share a KV head are that head's queries: one (b, kv head) pair reads
    # its keys once for the whole group (enable_gqa would read them once per query head, and in
    # bfloat16 took a path ~4x slower).
    query = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if batch == 1:  # one sequence, no padding: nothing to mask
        return F.scaled_dot_product_attention(query, k, v, scale=scale).view(batch, num_heads, head_dim)
    valid = torch.arange(longest, device=q.device) < lens[:, None]  # (batch, longest)
    mask = valid[:, None, None, :]  # broadcast over KV heads and the group's queries
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    if bool(out.isnan().any()):  # a non-finite value in a masked slot: zero the tails and redo
        tail = ~mask.transpose(-1, -2)  # (batch, 1, longest, 1)
        k, v = k.masked_fill(tail, 0.0), v.masked_fill(tail, 0.0)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return out.view(batch, num_heads, head_dim)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first `tokens` slots of every row's blocks: (batch, kv_heads, tokens, head_dim), a view
    of one contiguous copy (SDPA reads strided operands)."""
    _, block_size, num_kv_heads, head_dim = cache.shape
    batch = block_tables.shape[0]
    used = min(block_tables.shape[1], -(-tokens // block_size))
    ids = block_tables[:, :used].reshape(-1).long()
    blocks = cache.index_select(0, ids)  # (batch * used, block_size, kv_heads, head_dim), whole blocks
    per_seq = blocks.view(batch, used * block_size, num_kv_heads, head_dim)[:, :tokens]
    return per_seq.transpose(1, 2)
