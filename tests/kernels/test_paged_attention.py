"""Paged decode attention: the torch reference and the CPU path against textbook attention, the
wrapper's checks, the Triton kernel against the reference (under the interpreter here, compiled on a GPU)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from kernel_cases import decode_case, dense_attention_f64, run_in_interpreter

from kernels.paged_attention import DecodeLaunchConfig, paged_attention_decode, paged_attention_decode_ref
from kernels.paged_attention_cpu import decode_attention_cpu, paged_attention_decode_cpu, plan_decode


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_equals_dense_float64_attention(block_size: int, group: int) -> None:
    # Mixed lengths, none a multiple of the block size but one; unused slots hold NaN.
    case = decode_case([1, 17, 50, 16], num_kv_heads=2, group=group, head_dim=16, block_size=block_size)

    out = paged_attention_decode_ref(*case.args)

    assert out.shape == (4, 2 * group, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dense_attention_f64(case), atol=1e-5, rtol=1e-5)


def test_a_one_token_context_returns_that_tokens_value() -> None:
    case = decode_case([1], num_kv_heads=1, group=4, head_dim=16, block_size=8)
    first_block = int(case.block_tables[0, 0])

    out = paged_attention_decode(*case.args)

    assert torch.equal(out[0], case.v_cache[first_block, 0, 0].expand(4, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_keeps_16_bit_inputs_within_their_precision(dtype: torch.dtype) -> None:
    case = decode_case([30, 9], num_kv_heads=2, group=2, head_dim=32, block_size=16, dtype=dtype)

    out = paged_attention_decode_ref(*case.args)

    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_attention_f64(case), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("lens", [[5, 40, 16, 1], [33]])
@pytest.mark.parametrize("unused", ["nan", "finite"])
def test_cpu_path_equals_dense_float64_attention(lens: list[int], unused: str) -> None:
    # NaN in the slots past a context takes the recompute; finite stale values the fast path.
    case = decode_case(lens, num_kv_heads=2, group=3, head_dim=16, block_size=16)
    if unused == "finite":
        case = replace(case, k_cache=case.k_cache.nan_to_num(7.0), v_cache=case.v_cache.nan_to_num(-5.0))

    out = paged_attention_decode_cpu(*case.args)

    assert torch.equal(out, paged_attention_decode(*case.args))  # what CPU tensors run
    torch.testing.assert_close(out.double(), dense_attention_f64(case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lens", [[5, 40, 16, 1], [33]])
def test_a_planned_step_gives_every_layer_what_the_cpu_path_gives(lens: list[int]) -> None:
    # The engine plans the gather once per step and reads each layer's (2, blocks, ...) tensor.
    case = decode_case(lens, num_kv_heads=2, group=3, head_dim=16, block_size=16)
    plan = plan_decode(case.block_tables, case.context_lens, block_size=16)
    layers = [torch.stack((case.k_cache, case.v_cache)), torch.stack((case.k_cache * 0.5, case.v_cache + 1.0))]

    for kv_layer in layers:
        out = decode_attention_cpu(case.q, kv_layer, plan, case.scale)

        expected = paged_attention_decode_cpu(case.q, kv_layer[0], kv_layer[1], *case.args[3:])
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_path_keeps_16_bit_inputs_within_their_precision(dtype: torch.dtype) -> None:
    case = decode_case([30, 9], num_kv_heads=2, group=2, head_dim=32, block_size=16, dtype=dtype)

    out = paged_attention_decode_cpu(*case.args)

    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), dense_attention_f64(case), atol=2e-2, rtol=2e-2)


def _bad(field: str, value: object):  # one broken argument, everything else valid
    case = decode_case([5, 9], num_kv_heads=2, group=2, head_dim=16, block_size=8)
    args = dict(
        q=case.q, k_cache=case.k_cache, v_cache=case.v_cache,
        block_tables=case.block_tables, context_lens=case.context_lens, scale=case.scale,
    )  # fmt: skip
    args[field] = value(args) if callable(value) else value
    return args


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("q", lambda a: a["q"][:, :3], "multiple of num_kv_heads"),
        ("q", lambda a: a["q"][..., :8], "head_dim differs"),
        ("q", lambda a: a["q"].half(), "share one dtype"),
        ("q", lambda a: a["q"][0], r"\(batch, num_heads, head_dim\)"),
        ("v_cache", lambda a: a["v_cache"][:-1], "must both be"),
        (
            "k_cache",
            lambda a: a["k_cache"].transpose(1, 3).contiguous().transpose(1, 3),
            "contiguous in its last",
        ),
        ("block_tables", lambda a: a["block_tables"].long(), "must be int32"),
        ("block_tables", lambda a: a["block_tables"][:1], r"block_tables must be \(batch=2"),
        ("context_lens", lambda a: a["context_lens"][:1], r"context_lens must be \(2,\)"),
        ("scale", float("nan"), "positive finite"),
    ],
)
def test_wrapper_names_the_bad_argument(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paged_attention_decode(**_bad(field, value))


def test_triton_kernel_matches_reference_in_interpreter() -> None:
    pytest.importorskip("triton")
    run_in_interpreter("interpreted_paged_attention.py")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernel_matches_reference_on_llama_8b_shapes(batch: int, dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 3000, (batch,), generator=gen).tolist()
    lens[0] = 2999  # one long context, so short batches split into partitions
    case = decode_case(lens, num_kv_heads=8, group=4, head_dim=128, block_size=16, dtype=dtype, device="cuda")

    want = paged_attention_decode_ref(*case.args).float()
    for config in (
        DecodeLaunchConfig(),
        DecodeLaunchConfig(partition_size=128),
        DecodeLaunchConfig(dot_fp32=True),
    ):
        got = paged_attention_decode(*case.args, use_triton=True, config=config).float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
