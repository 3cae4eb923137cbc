"""The Triton pack/unpack kernel on CPU tensors under TRITON_INTERPRET=1, against the reference.

Run by test_kv_pack.py in a subprocess (the file name keeps pytest from collecting it in the main
process, where the interpreter switch is off).
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import kv_pool, nan_staging, same_bytes

from kernels._triton import interpreter_active
from kernels.kv_pack import copy_blocks, copy_blocks_ref, pack_blocks, pack_blocks_ref, unpack_blocks, unpack_blocks_ref

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1")

IDS = {1: [6], 5: [9, 2, 11, 0, 5]}  # unsorted, with gaps


@pytest.mark.parametrize("n", list(IDS))
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_pack_and_unpack_match_reference_byte_for_byte(dtype: torch.dtype, num_layers: int, n: int) -> None:
    layers = kv_pool(num_layers, num_blocks=12, dtype=dtype)
    ids = torch.tensor(IDS[n])
    got, want = nan_staging(layers, n), nan_staging(layers, n)

    pack_blocks(layers, ids, got, use_triton=True)
    pack_blocks_ref(layers, ids, want)
    assert same_bytes(got, want)

    receiver = [torch.full_like(layer, float("nan")) for layer in layers]
    receiver_ref = [torch.full_like(layer, float("nan")) for layer in layers]
    unpack_blocks(got, receiver, ids, use_triton=True)
    unpack_blocks_ref(want, receiver_ref, ids)
    for layer, mine, ref in zip(layers, receiver, receiver_ref, strict=True):
        assert same_bytes(mine, ref)  # the named blocks restored, every other block still NaN
        assert same_bytes(mine[:, ids], layer[:, ids])


def test_many_separately_allocated_layers_in_one_launch() -> None:
    layers = kv_pool(10, num_blocks=5, block_size=2, num_kv_heads=1, head_dim=4, dtype=torch.bfloat16)
    ids = torch.tensor([3, 1])
    got, want = nan_staging(layers, 2), nan_staging(layers, 2)

    pack_blocks(layers, ids, got, use_triton=True)
    pack_blocks_ref(layers, ids, want)

    assert same_bytes(got, want)


def test_odd_sized_blocks_are_copied_in_narrower_words() -> None:
    # A block of 3 bf16 values is 6 bytes: no int64 or int32 word fits, int16 does.
    layers = kv_pool(2, num_blocks=4, block_size=3, num_kv_heads=1, head_dim=1, dtype=torch.bfloat16)
    ids = torch.tensor([2, 0])
    got, want = nan_staging(layers, 2), nan_staging(layers, 2)

    pack_blocks(layers, ids, got, use_triton=True)
    pack_blocks_ref(layers, ids, want)

    assert same_bytes(got, want)


def test_unpack_skips_an_id_outside_the_pool_instead_of_writing_past_it() -> None:
    # The layer is the front of a larger buffer; block id 4 would land in V's first block (for K)
    # and in the buffer's tail (for V).
    buffer = torch.full((3, 4, 2, 1, 4), float("nan"))
    layer = buffer[:2]  # (2, num_blocks=4, block_size=2, kv_heads=1, head_dim=4)
    staging = torch.ones(1, 2, 2, 2, 1, 4)

    unpack_blocks(staging, [layer], torch.tensor([1, 4]), use_triton=True)

    assert (layer[:, 1] == 1).all()
    assert torch.isnan(layer[:, [0, 2, 3]]).all() and torch.isnan(buffer[2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_block_to_block_copy_matches_reference_between_pools_of_different_sizes(dtype: torch.dtype) -> None:
    src = kv_pool(3, num_blocks=12, dtype=dtype)
    dst = [torch.full((2, 7, *layer.shape[2:]), float("nan"), dtype=dtype) for layer in src]
    dst_ref = [layer.clone() for layer in dst]
    src_ids, dst_ids = torch.tensor([9, 2, 11, 0]), torch.tensor([6, 0, 3, 5])

    copy_blocks(src, src_ids, dst, dst_ids, use_triton=True)
    copy_blocks_ref(src, src_ids, dst_ref, dst_ids)

    for mine, ref, layer in zip(dst, dst_ref, src, strict=True):
        assert same_bytes(mine, ref)  # the named blocks written, every other block still NaN
        assert same_bytes(mine[:, dst_ids], layer[:, src_ids])
