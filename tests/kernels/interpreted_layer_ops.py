"""The layer-op Triton kernels on CPU tensors under TRITON_INTERPRET=1, against the torch references.

Run by test_layer_ops.py in a subprocess (the file name keeps pytest from collecting it in the
main process, where the interpreter switch is off). The interpreter computes in numpy float32,
so the kernels' roundings to bf16 must give the references' values exactly, except where a
float32 sum's order moves one (the norm's mean of squares; checked within one bf16 ulp).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import same_bytes

from kernels._triton import interpreter_active
from kernels.layer_ops import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    rotary_split,
    rotary_split_ref,
    silu_mul,
    silu_mul_ref,
)

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.bfloat16]


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # one bf16 ulp where the float32 sum's order moved a rounding
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2**-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("rows", "dim"), [(1, 8), (5, 67), (3, 200)])
def test_rms_norm_matches_the_reference(rows: int, dim: int, dtype: torch.dtype) -> None:
    x, w = _randn(rows, dim, dtype=dtype, seed=dim), _randn(dim, dtype=dtype, seed=1)
    _close(rms_norm(x, w, 1e-5, use_triton=True), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_add_rms_norm_matches_the_reference_and_can_update_the_residual_in_place(dtype: torch.dtype) -> None:
    x, res, w = _randn(7, 96, dtype=dtype, seed=2), _randn(7, 96, dtype=dtype, seed=3), _randn(96, dtype=dtype, seed=4)
    want_norm, want_sum = add_rms_norm_ref(x, res, w, 1e-6)
    normed, summed = add_rms_norm(x, res, w, 1e-6, residual_out=res, use_triton=True)
    assert summed is res
    assert torch.equal(res, want_sum)  # the add rounds as the reference's does: exactly
    _close(normed, want_norm)


def test_norm_writes_into_a_strided_out_and_reads_a_strided_x() -> None:
    big = _randn(4, 40, dtype=torch.bfloat16, seed=5)
    x, w = big[:, :33], _randn(33, dtype=torch.bfloat16, seed=6)
    out = torch.full((4, 50), float("nan"), dtype=torch.bfloat16)
    rms_norm(x, w, 1e-5, out=out[:, 10:43], use_triton=True)
    _close(out[:, 10:43], rms_norm_ref(x, w, 1e-5))
    assert torch.isnan(out[:, :10].float()).all() and torch.isnan(out[:, 43:].float()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 8), (6, 2, 6), (3, 1, 16)])
def test_rotary_split_matches_the_reference_exactly(
    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    tokens = 5
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=heads)
    cos, sin = _randn(tokens, head_dim, dtype=dtype, seed=7), _randn(tokens, head_dim, dtype=dtype, seed=8)
    got = rotary_split(qkv, cos, sin, heads, kv_heads, head_dim, use_triton=True)
    want = rotary_split_ref(qkv, cos, sin, heads, kv_heads, head_dim)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_rotary_split_writes_into_given_buffers_and_reads_a_strided_qkv() -> None:
    heads, kv_heads, hd = 4, 2, 8
    wide = _randn(3, 100, dtype=torch.bfloat16, seed=9)
    qkv = wide[:, : (heads + 2 * kv_heads) * hd]  # row stride 100
    cos, sin = _randn(3, hd, dtype=torch.bfloat16, seed=10), _randn(3, hd, dtype=torch.bfloat16, seed=11)
    out = tuple(torch.full((3, h, hd), float("nan"), dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    got = rotary_split(qkv, cos, sin, heads, kv_heads, hd, out=out, use_triton=True)  # type: ignore[arg-type]
    for g, o, w in zip(got, out, rotary_split_ref(qkv, cos, sin, heads, kv_heads, hd), strict=True):
        assert g is o
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("rows", "width"), [(1, 3), (4, 37), (2, 1500)])
def test_silu_mul_matches_the_reference(rows: int, width: int, dtype: torch.dtype) -> None:
    gate_up = _randn(rows, 2 * width, dtype=dtype, seed=width) * 4
    _close(silu_mul(gate_up, use_triton=True), silu_mul_ref(gate_up))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_rotary_split_writes_k_and_v_into_the_cache_slots_and_skips_negative_ones(dtype: torch.dtype) -> None:
    heads, kv_heads, hd, block_size = 4, 2, 8, 4
    tokens = 6
    qkv = _randn(tokens, (heads + 2 * kv_heads) * hd, dtype=dtype, seed=12)
    cos, sin = _randn(tokens, hd, dtype=dtype, seed=13), _randn(tokens, hd, dtype=dtype, seed=14)
    slots = torch.tensor([9, 2, 17, -1, 0, -1])  # scattered, two padding rows
    got_cache = torch.full((2, 5, block_size, kv_heads, hd), float("nan"), dtype=dtype)
    want_cache = got_cache.clone()
    got = rotary_split(qkv, cos, sin, heads, kv_heads, hd, cache=(got_cache, slots), use_triton=True)
    want = rotary_split(qkv, cos, sin, heads, kv_heads, hd, cache=(want_cache, slots), use_triton=False)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert same_bytes(got_cache, want_cache)  # the named slots written, every other slot still NaN
    flat = got_cache.view(2, -1, kv_heads, hd)
    assert torch.equal(flat[0, [9, 2, 17, 0]], want[1][[0, 1, 2, 4]])
    assert torch.isnan(flat[:, [1, 3, 4, 5]].float()).all()
