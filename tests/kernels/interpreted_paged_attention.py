"""The Triton paged-attention kernel on CPU tensors under TRITON_INTERPRET=1, against the reference.

Run by test_paged_attention.py in a subprocess (the file name keeps pytest from collecting it in
the main process, where the interpreter switch is off).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import decode_case

from kernels._triton import interpreter_active
from kernels.paged_attention import DecodeLaunchConfig, paged_attention_decode, paged_attention_decode_ref

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# One program per (sequence, KV head) or the context cut into many 16-token partitions and merged.
SPLITS = {
    "single": DecodeLaunchConfig(block_n=16),
    "split": DecodeLaunchConfig(block_n=16, partition_size=16),
}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_kernel_matches_reference(group: int, block_size: int, dtype: torch.dtype, split: str) -> None:
    case = decode_case([1, 17, 50, 8], num_kv_heads=2, group=group, head_dim=16, block_size=block_size, dtype=dtype)

    got = paged_attention_decode(*case.args, use_triton=True, config=SPLITS[split])

    assert got.dtype == dtype and got.shape == case.q.shape
    want = paged_attention_decode_ref(*case.args)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_uneven_partitions_and_padded_head_dim_match_reference() -> None:
    # 48 = 3 loop steps of 16; head_dim 24 pads to 32; 5 query heads per KV head pad to 16 rows.
    config = DecodeLaunchConfig(block_n=16, partition_size=48)
    case = decode_case([100, 47, 49, 3], num_kv_heads=1, group=5, head_dim=24, block_size=16, seed=3)

    got = paged_attention_decode(*case.args, use_triton=True, config=config)

    torch.testing.assert_close(got, paged_attention_decode_ref(*case.args), atol=1e-5, rtol=1e-5)


def test_default_split_of_a_long_table_matches_reference() -> None:
    # The interpreter counts as one multiprocessor, so the default asks for 2 programs: one sequence
    # with one KV head gets its 80-token table (5 blocks) cut into 2 partitions of 48 tokens.
    config = DecodeLaunchConfig(block_n=16)
    case = decode_case([60], num_kv_heads=1, group=2, head_dim=16, block_size=16)
    assert config.partitions(batch=1, num_kv_heads=1, max_context=80, num_sms=1) == (48, 2)

    got = paged_attention_decode(*case.args, use_triton=True, config=config)

    torch.testing.assert_close(got, paged_attention_decode_ref(*case.args), atol=1e-5, rtol=1e-5)
