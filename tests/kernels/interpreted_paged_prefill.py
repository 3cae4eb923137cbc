"""The prefill-chunk Triton kernel on CPU tensors under TRITON_INTERPRET=1, against float64 attention.

Run by test_paged_prefill.py in a subprocess (the file name keeps pytest from collecting it in
the main process, where the interpreter switch is off).
"""

from __future__ import annotations

import pytest
import torch
from test_paged_prefill import dense_prefill_f64, prefill_case

from kernels._triton import interpreter_active
from kernels.paged_prefill import paged_prefill

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("chunks", [[(0, 5)], [(13, 7), (0, 3), (30, 21)]], ids=["one", "three"])
def test_kernel_matches_float64_attention_and_writes_only_the_chunks_rows(
    chunks: list[tuple[int, int]], group: int, dtype: torch.dtype
) -> None:
    case = prefill_case(chunks, num_kv_heads=2, group=group, head_dim=8, block_size=4, dtype=dtype, decode_rows=2)
    out = torch.full_like(case.q, float("nan"))
    max_new = max(n for _, n in chunks)
    paged_prefill(case.q, case.k_cache, case.v_cache, case.info, case.blocks, case.scale, max_new, out)
    want = dense_prefill_f64(case)
    rows = case.chunk_rows
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[rows].double(), want[rows], atol=tol, rtol=tol)
    assert torch.isnan(out[:2].float()).all()  # the decode rows: untouched
