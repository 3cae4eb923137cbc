"""The compiled CPU decode-attention kernel (kernels/cpu_native.py) against textbook attention and
against the torch path it replaces; the plan's checks that keep bad tables away from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from kernel_cases import DecodeCase, decode_case, dense_attention_f64

from kernels.cpu_native import native_decode_attention, supports_layer
from kernels.paged_attention_cpu import decode_attention_cpu, paged_attention_decode_cpu, plan_decode

NATIVE = native_decode_attention()
needs_native = pytest.mark.skipif(NATIVE is None, reason="no C compiler here to build the kernel")


def layer(case: DecodeCase) -> torch.Tensor:
    return torch.stack((case.k_cache, case.v_cache))


def native_out(case: DecodeCase) -> torch.Tensor:
    block_size = case.k_cache.shape[1]
    plan = plan_decode(case.block_tables, case.context_lens, block_size, NATIVE)
    assert plan.native is not None  # the kernel, not the SDPA fallback, answers
    return decode_attention_cpu(case.q, layer(case), plan, case.scale)


@needs_native
@pytest.mark.parametrize(
    ("group", "head_dim"),
    [(1, 16), (3, 64), (4, 128), (2, 32)],  # generic shapes and the two unrolled ones (3x64, 4x128)
)
@pytest.mark.parametrize("lens", [[5, 40, 16, 1], [33], [300, 7]])
def test_native_equals_dense_float64_attention(group: int, head_dim: int, lens: list[int]) -> None:
    # Every slot past a context holds NaN (decode_case): the kernel must never read one.
    case = decode_case(lens, num_kv_heads=2, group=group, head_dim=head_dim, block_size=16)

    out = native_out(case)

    assert out.dtype == torch.float32 and not out.isnan().any()
    torch.testing.assert_close(out.double(), dense_attention_f64(case), atol=1e-5, rtol=1e-5)


@needs_native
def test_native_bfloat16_stays_within_a_unit_of_the_sdpa_path() -> None:
    case = decode_case([300, 9, 64, 17], num_kv_heads=3, group=3, head_dim=64, block_size=16, dtype=torch.bfloat16)
    finite = replace(case, k_cache=case.k_cache.nan_to_num(0.0), v_cache=case.v_cache.nan_to_num(0.0))

    out = native_out(case)
    sdpa = paged_attention_decode_cpu(*finite.args)

    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_attention_f64(finite), atol=2e-2, rtol=2e-2)
    # Values are ~N(0, 1): one bfloat16 unit at 1 bounds the two roundings' difference.
    assert float((out.float() - sdpa.float()).abs().max()) <= torch.finfo(torch.bfloat16).eps


@needs_native
def test_a_zero_length_context_gives_zeros_not_nan() -> None:
    case = decode_case([4, 9], num_kv_heads=1, group=2, head_dim=16, block_size=8)
    case = replace(case, context_lens=torch.tensor([0, 9], dtype=torch.int32))

    out = native_out(case)

    assert torch.equal(out[0], torch.zeros_like(out[0]))
    whole = dense_attention_f64(replace(case, context_lens=torch.tensor([4, 9], dtype=torch.int32)))
    torch.testing.assert_close(out[1].double(), whole[1], atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize(
    "broken",
    [
        lambda c: replace(c, context_lens=c.context_lens + 1000),  # past the table's blocks
        lambda c: replace(c, block_tables=c.block_tables - 100),  # negative block ids
    ],
)
def test_tables_the_kernel_cannot_trust_take_the_torch_path(broken: Callable[[DecodeCase], DecodeCase]) -> None:
    case = broken(decode_case([5, 9], num_kv_heads=2, group=2, head_dim=16, block_size=8))

    plan = plan_decode(case.block_tables, case.context_lens, 8, NATIVE)

    assert plan.native is None


@needs_native
def test_block_ids_past_the_layers_cache_take_the_torch_path() -> None:
    case = decode_case([5, 9], num_kv_heads=2, group=2, head_dim=16, block_size=8)
    plan = plan_decode(case.block_tables, case.context_lens, 8, NATIVE)
    small = layer(case)[:, : plan.max_block_id]  # the highest id the tables use is out of range here

    with pytest.raises(RuntimeError, match="out of DATA bounds"):  # the gather refuses; the kernel would read past
        decode_attention_cpu(case.q, small.contiguous(), plan, case.scale)


def test_shapes_the_kernel_does_not_take() -> None:
    kv = torch.zeros(2, 4, 8, 2, 16)
    assert supports_layer(kv, num_heads=4)
    assert not supports_layer(kv.half(), num_heads=4)  # float16: the torch path
    assert not supports_layer(torch.zeros(2, 4, 8, 2, 24), num_heads=4)  # head_dim not a multiple of 16
    assert not supports_layer(torch.zeros(2, 4, 8, 1, 16), num_heads=17)  # more than 16 query heads per KV head
