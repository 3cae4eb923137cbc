"""The compiled RMSNorm (kernels/cpu_norm.py) against the model's torch ops."""

from __future__ import annotations

import pytest
import torch

from engine.model import RMSNorm
from kernels.cpu_norm import native_rms_norm

NATIVE = native_rms_norm()
pytestmark = pytest.mark.skipif(NATIVE is None, reason="no C compiler here to build the kernel")


def norm(dim: int, dtype: torch.dtype, seed: int) -> tuple[RMSNorm, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    module = RMSNorm(dim, 1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(dim, generator=gen) * 0.3 + 1)
    return module, gen


@pytest.mark.parametrize("rows", [1, 8, 33])
@pytest.mark.parametrize("dim", [64, 576, 100])  # 100: a tail past the last 16 lanes
def test_bfloat16_equals_the_torch_ops_bit_for_bit(rows: int, dim: int) -> None:
    module, gen = norm(dim, torch.bfloat16, rows * dim)
    x = (torch.randn(rows, dim, generator=gen) * 3).bfloat16()

    want = module(x)
    module.native = NATIVE
    got = module(x)

    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("rows", [1, 8, 33])
def test_float32_differs_from_the_torch_ops_in_the_last_places_at_most(rows: int) -> None:
    module, gen = norm(576, torch.float32, rows)
    x = torch.randn(rows, 576, generator=gen) * 3

    want = module(x)
    module.native = NATIVE
    got = module(x)

    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)  # a few units in the last place


def test_rows_it_does_not_take_go_through_the_torch_ops() -> None:
    module, gen = norm(64, torch.float32, 0)
    x = torch.randn(64, 8, generator=gen).t()  # not contiguous
    want = module(x)
    module.native = NATIVE

    assert not NATIVE.supports(x, module.weight)
    assert torch.equal(module(x), want)
