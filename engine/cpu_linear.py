"""Linear layers for the CPU: weights reordered once for oneDNN, so every step skips the BLAS.

Why: torch's `F.linear` on float32 CPU tensors calls MKL, and MKL takes a generic AVX2 path on
non-Intel CPUs: on the AMD EPYC (Zen 5, AVX-512) machines this project runs on, the same
linears took ~1.5x as long through it at one row, ~2.4x at 32 and ~2.2x at 256 as through
oneDNN (BENCHMARKS.md). oneDNN picks its kernels by instruction set, not by vendor, and a weight
reordered once into its blocked layout is read without a per-call repack. bfloat16 goes through
oneDNN either way; the reorder still saves the per-call packing. vLLM's CPU backend does the
same (a oneDNN matmul handle per layer, created at load).

The ops used (`torch.ops.mkldnn._reorder_linear_weight`, `_linear_pointwise`) are the ones
TorchInductor emits for frozen CPU linears; they are private to torch, so `packing_supported`
checks they exist and the model keeps plain `nn.Linear` otherwise. Results are float32-exact
matmuls (IEEE, no implicit down-conversion); the accumulation order differs from MKL's, as any
two BLAS libraries' do.
"""

from __future__ import annotations

import torch
from torch import nn

_PACKABLE = (torch.float32, torch.bfloat16)
_NO_SCALARS: list[float] = []  # the op's post-op scalars: none (it only reads them)


def packing_supported(dtype: torch.dtype) -> bool:
    return (
        dtype in _PACKABLE
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's layout; inference only, on CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            # batch_size=None: one layout for every number of rows (decode steps and prefills).
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach().clone()
        self._linear = torch.ops.mkldnn._linear_pointwise.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op's overload resolved once, and no reshape for the engine's 2-D rows: ~3 µs a call
        # less, of ~12 µs for a one-row linear; 121 calls a SmolLM2 step.
        linear = self._linear
        if x.dim() == 2:
            return linear(x, self.packed, self.bias, "none", _NO_SCALARS, "")
        y = linear(x.reshape(-1, self.in_features), self.packed, self.bias, "none", _NO_SCALARS, "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear under `model` by a PackedLinear; returns how many were replaced.

    Call after the weights are loaded: the packed copies are taken now, and the Linear's own
    parameters are dropped with it (named_parameters() no longer lists them).
    """
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(linear.weight, linear.bias))
    return len(targets)
