"""oneDNN-packed linears: the same products as nn.Linear, for any number of rows, and a model
packed after loading computes what it computed before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.cpu_linear import PackedLinear, pack_linears, packing_supported
from engine.model import LlamaModel
from engine.model_config import ModelConfig

pytestmark = pytest.mark.skipif(not packing_supported(torch.float32), reason="torch built without oneDNN")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (300, 48), (2, 7, 48)])
def test_packed_linear_equals_nn_linear(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=True).to(dtype)
    x = torch.randn(shape).to(dtype)

    out = PackedLinear(linear.weight, linear.bias)(x)

    assert out.shape == (*shape[:-1], 80) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), linear(x).float(), atol=tol, rtol=tol)


def test_pack_linears_replaces_every_linear_and_keeps_the_rest() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)))
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model.modules()].count("PackedLinear") == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_model_computes_what_it_did(tied: bool) -> None:
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaModel(config).eval()
    model.init_random(seed=0, std=0.2)
    hidden = torch.randn(3, 32)
    before = model.logits(hidden)

    model.pack_for_cpu()

    assert isinstance(model.lm_head, PackedLinear)
    torch.testing.assert_close(model.logits(hidden), before, atol=1e-5, rtol=1e-5)
