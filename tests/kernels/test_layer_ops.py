"""The layer ops (kernels/layer_ops.py): the wrappers' checks and CPU fallbacks here, the Triton
kernels under the interpreter (interpreted_layer_ops.py) and compiled on a GPU (marker gpu)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import run_in_interpreter

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


def test_cpu_tensors_take_the_references_and_fill_given_outputs() -> None:
    x, res, w = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    out, res_out = torch.empty(3, 16), torch.empty(3, 16)
    normed, summed = add_rms_norm(x, res, w, 1e-5, out=out, residual_out=res_out)
    want_norm, want_sum = add_rms_norm_ref(x, res, w, 1e-5)
    assert normed is out and summed is res_out
    assert torch.equal(out, want_norm) and torch.equal(res_out, want_sum)
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    assert torch.equal(silu_mul(x), silu_mul_ref(x))


def test_rotary_reference_is_the_rotate_half_convention() -> None:
    heads, kv_heads, hd = 2, 1, 4
    qkv = torch.randn(3, (heads + 2 * kv_heads) * hd, dtype=torch.float64)
    angle = torch.randn(3, hd // 2, dtype=torch.float64)
    cos = torch.cat((angle.cos(), angle.cos()), -1)
    sin = torch.cat((angle.sin(), angle.sin()), -1)
    signed = torch.cat((-angle.sin(), angle.sin()), -1)
    q, k, v = rotary_split_ref(qkv, cos, signed, heads, kv_heads, hd)
    x = qkv[:, : (heads + kv_heads) * hd].view(3, heads + kv_heads, hd)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    textbook = x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]
    torch.testing.assert_close(torch.cat((q, k), 1), textbook)
    assert torch.equal(v.flatten(1), qkv[:, (heads + kv_heads) * hd :])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5, use_triton=True), r"weight must be \(8,\)"),
        (lambda: rms_norm(torch.randn(2, 8), torch.randn(8).half(), 1e-5, use_triton=True), "in x's dtype"),
        (lambda: add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-5, use_triton=True), "residual"),
        (lambda: silu_mul(torch.randn(2, 7), use_triton=True), r"\(rows, 2 \* width\)"),
        (
            lambda: rotary_split(torch.randn(2, 30), torch.randn(2, 4), torch.randn(2, 4), 4, 2, 4, use_triton=True),
            "qkv",
        ),
        (
            lambda: rms_norm(torch.randn(2, 8).to(torch.int32), torch.randn(8), 1e-5, use_triton=True),
            "Triton path takes",
        ),
    ],
)
def test_wrappers_name_the_bad_argument(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()


def test_triton_kernels_match_references_in_interpreter() -> None:
    pytest.importorskip("triton")
    run_in_interpreter("interpreted_layer_ops.py")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernels_match_references_on_llama_8b_shapes(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    dev, tokens, hidden, heads, kv_heads, hd, ffn = "cuda", 320, 4096, 32, 8, 128, 14336
    x, res = torch.randn(tokens, hidden, device=dev, dtype=dtype), torch.randn(tokens, hidden, device=dev, dtype=dtype)
    w = torch.rand(hidden, device=dev, dtype=dtype) + 0.5
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), **tol)
    normed, summed = add_rms_norm(x, res, w, 1e-5)
    want_norm, want_sum = add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(summed, want_sum)
    torch.testing.assert_close(normed, want_norm, **tol)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * hd, device=dev, dtype=dtype)
    cos, sin = torch.randn(tokens, hd, device=dev, dtype=dtype), torch.randn(tokens, hd, device=dev, dtype=dtype)
    cache = torch.full((2, 40, 16, kv_heads, hd), float("nan"), device=dev, dtype=dtype)
    slots = torch.randperm(40 * 16, device=dev)[:tokens]
    slots[::7] = -1  # padding rows: not written
    got = rotary_split(qkv, cos, sin, heads, kv_heads, hd, cache=(cache, slots))
    for g, want in zip(got, rotary_split_ref(qkv, cos, sin, heads, kv_heads, hd), strict=True):
        torch.testing.assert_close(g, want, **tol)
    flat, kept = cache.view(2, -1, kv_heads, hd), slots >= 0
    assert torch.equal(flat[0, slots[kept]], got[1][kept]) and torch.equal(flat[1, slots[kept]], got[2][kept])
    assert int(torch.isnan(flat[0].flatten(1)).all(1).sum()) == 40 * 16 - int(kept.sum())
    gate_up = torch.randn(tokens, 2 * ffn, device=dev, dtype=dtype) * 4
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), **tol)
