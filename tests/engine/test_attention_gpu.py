"""Prefill attention on CUDA (flash, causal aligned to the lower right for a chunk after a cached
prefix) against the same attention with an explicit mask. Runs on the GPU machine (marker gpu)."""

from __future__ import annotations

import pytest
import torch

from engine.attention import PrefillSpan, _prefill_chunk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(("cached", "new"), [(0, 300), (16, 1), (48, 200), (2048, 2048), (1000, 24)])
def test_a_chunk_after_a_cached_prefix_attends_like_the_explicit_mask(cached: int, new: int) -> None:
    torch.manual_seed(cached + new)
    heads, kv_heads, hd, block = 32, 8, 128, 16
    ctx = cached + new
    num_blocks = -(-ctx // block) + 3
    kv = torch.randn(2, num_blocks, block, kv_heads, hd, device="cuda", dtype=torch.bfloat16)
    order = torch.randperm(num_blocks, device="cuda")[: -(-ctx // block)]
    q = torch.randn(new, heads, hd, device="cuda", dtype=torch.bfloat16)
    flat = kv[:, order].flatten(1, 2)[:, :ctx]  # (2, ctx, kv_heads, hd): what the span's blocks hold
    k, v = flat[0, cached:], flat[1, cached:]
    span = PrefillSpan(0, new, ctx, order)
    ours = _prefill_chunk(q, k, v, kv, span, hd**-0.5).float()
    mask = torch.arange(ctx, device="cuda")[None, :] <= torch.arange(cached, ctx, device="cuda")[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None].float(), flat[0].transpose(0, 1)[None].float(), flat[1].transpose(0, 1)[None].float(),
        attn_mask=mask, scale=hd**-0.5, enable_gqa=True,
    )[0].transpose(0, 1)  # fmt: skip
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-2
