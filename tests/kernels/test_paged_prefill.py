"""Prefill-chunk attention over the paged cache (kernels/paged_prefill.py): the reference against
float64 attention here, the Triton kernel under the interpreter (interpreted_paged_prefill.py)
and compiled on a GPU (marker gpu). Unused cache slots hold NaN, so a kernel that reads one shows it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_cases import run_in_interpreter

from kernels.paged_prefill import paged_prefill, paged_prefill_ref


@dataclass(frozen=True)
class PrefillCase:
    q: torch.Tensor  # (tokens, heads, head_dim): decode_rows rows first, then each chunk's
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    info: torch.Tensor  # (chunks, 4) int64
    blocks: torch.Tensor  # int64
    scale: float
    chunk_rows: list[int]
    contexts: list[tuple[int, int, int, list[int]]]  # per chunk: row0, n, ctx, block ids


def prefill_case(
    chunks: list[tuple[int, int]],  # (cached prefix, new tokens) of each chunk
    *, num_kv_heads: int, group: int, head_dim: int, block_size: int, dtype: torch.dtype,
    decode_rows: int = 0, device: str = "cpu", seed: int = 0,
) -> PrefillCase:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    needs = [-(-(p + n) // block_size) for p, n in chunks]
    num_blocks = 1 + sum(needs) + 2
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    info, blocks, contexts, rows, row = [], [], [], [], decode_rows
    for (prefix, n), nb in zip(chunks, needs, strict=True):
        ids = [free.pop() for _ in range(nb)]
        ctx = prefix + n
        toks = torch.arange(ctx)
        where = torch.tensor(ids)[toks // block_size], toks % block_size
        k_cache[where] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        v_cache[where] = torch.randn(ctx, num_kv_heads, head_dim, generator=gen)
        info.append([row, n, ctx, len(blocks)])
        contexts.append((row, n, ctx, ids))
        blocks += ids
        rows += list(range(row, row + n))
        row += n
    q = torch.randn(row, num_kv_heads * group, head_dim, generator=gen)
    return PrefillCase(
        q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype),
        torch.tensor(info, dtype=torch.int64, device=device), torch.tensor(blocks, dtype=torch.int64, device=device),
        head_dim**-0.5, rows, contexts,
    )  # fmt: skip


def dense_prefill_f64(case: PrefillCase) -> torch.Tensor:
    """Textbook causal softmax attention in float64, token by token; NaN for rows of no chunk."""
    out = torch.full(case.q.shape, float("nan"), dtype=torch.float64)
    block_size, num_kv_heads = case.k_cache.shape[1], case.k_cache.shape[2]
    group = case.q.shape[1] // num_kv_heads
    for row0, n, ctx, ids in case.contexts:
        at = [(ids[t // block_size], t % block_size) for t in range(ctx)]
        k = torch.stack([case.k_cache[b, s] for b, s in at]).double().cpu().repeat_interleave(group, dim=1)
        v = torch.stack([case.v_cache[b, s] for b, s in at]).double().cpu().repeat_interleave(group, dim=1)
        for i in range(n):
            pos = ctx - n + i
            logits = torch.einsum("hd,thd->ht", case.q[row0 + i].double().cpu(), k[: pos + 1]) * case.scale
            out[row0 + i] = torch.einsum("ht,thd->hd", torch.softmax(logits, -1), v[: pos + 1])
    return out


@pytest.mark.parametrize("group", [1, 4])
def test_reference_equals_float64_attention(group: int) -> None:
    case = prefill_case([(9, 6), (0, 4)], num_kv_heads=2, group=group, head_dim=8, block_size=4, dtype=torch.float32)
    out = paged_prefill_ref(case.q, case.k_cache, case.v_cache, case.info, case.blocks, case.scale, case.q.clone())
    torch.testing.assert_close(out.double(), dense_prefill_f64(case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: {"info": c.info[:, :3].contiguous()}, r"info must be \(chunks, 4\)"),
        (lambda c: {"blocks": c.blocks.int()}, "blocks must be"),
        (lambda c: {"out": c.q[:1].clone()}, "out must be"),
        (lambda c: {"k_cache": c.k_cache[:, :, :1]}, "k_cache, v_cache"),
        (lambda c: {"scale": 0.0}, "positive finite"),
    ],
)
def test_wrapper_names_the_bad_argument(change, message: str) -> None:  # type: ignore[no-untyped-def]
    case = prefill_case([(3, 2)], num_kv_heads=2, group=2, head_dim=8, block_size=4, dtype=torch.float32)
    args = {"q": case.q, "k_cache": case.k_cache, "v_cache": case.v_cache, "info": case.info, "blocks": case.blocks,
            "scale": case.scale, "max_new": 2, "out": case.q.clone()}  # fmt: skip
    args.update(change(case))
    with pytest.raises(ValueError, match=message):
        paged_prefill(**args)


def test_triton_kernel_matches_in_interpreter() -> None:
    pytest.importorskip("triton")
    run_in_interpreter("interpreted_paged_prefill.py")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernel_matches_reference_on_llama_8b_shapes(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    chunks = [(768, 256), (0, 512), (1000, 24), (16, 1)]
    case = prefill_case(chunks, num_kv_heads=8, group=4, head_dim=128, block_size=16, dtype=dtype, device="cuda",
                        decode_rows=3)  # fmt: skip
    got = paged_prefill(case.q, case.k_cache, case.v_cache, case.info, case.blocks, case.scale, 512,
                        torch.full_like(case.q, float("nan")))  # fmt: skip
    want = paged_prefill_ref(case.q, case.k_cache, case.v_cache, case.info, case.blocks, case.scale, case.q.clone())
    rows = case.chunk_rows
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[rows].float(), want[rows].float(), atol=tol, rtol=tol)
    assert torch.isnan(got[:3].float()).all()
