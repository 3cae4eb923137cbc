"""Packing a request's scattered KV blocks into a staging buffer and unpacking them into another pool."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import kv_pool, nan_staging, run_in_interpreter, same_bytes

from kernels.kv_pack import (
    copy_blocks,
    launch_copy,
    pack_blocks,
    pack_blocks_ref,
    plan_copy,
    unpack_blocks,
    validate_block_ids,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_pack_lays_blocks_out_in_the_order_asked(dtype: torch.dtype) -> None:
    layers = kv_pool(2, num_blocks=10, dtype=dtype)
    ids = torch.tensor([7, 2, 9])
    staging = nan_staging(layers, 3)

    pack_blocks(layers, ids, staging)

    for layer in range(2):
        for kv in range(2):
            for i, block in enumerate([7, 2, 9]):
                assert same_bytes(staging[layer, kv, i], layers[layer][kv, block])


def test_unpack_into_a_fresh_pool_restores_the_blocks_and_touches_nothing_else() -> None:
    # The sender's blocks 4, 0, 6 land in the receiver's blocks 1, 8, 3 (its own allocation).
    sender = kv_pool(3, num_blocks=8)
    receiver = [torch.full((2, 9, 4, 2, 8), float("nan")) for _ in range(3)]
    staging = nan_staging(sender, 3)

    pack_blocks(sender, torch.tensor([4, 0, 6]), staging)
    unpack_blocks(staging, receiver, torch.tensor([1, 8, 3]))

    for src, dst in zip(sender, receiver, strict=True):
        assert same_bytes(dst[:, [1, 8, 3]], src[:, [4, 0, 6]])
        untouched = [b for b in range(9) if b not in (1, 8, 3)]
        assert torch.isnan(dst[:, untouched]).all()


def test_validate_block_ids_accepts_distinct_ids_inside_the_pool() -> None:
    validate_block_ids(torch.tensor([5, 0, 3]), num_blocks=6)
    validate_block_ids(torch.tensor([], dtype=torch.int64), num_blocks=6)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([0, 6]), r"in \[0, 6\), got min 0 and max 6"),
        (torch.tensor([-1, 2]), r"got min -1"),
        (torch.tensor([2, 4, 2]), "distinct, got 1 repeats"),
        (torch.tensor([1, 2], dtype=torch.int32), "int64"),
        (torch.tensor([[1, 2]]), "1-D"),
    ],
)
def test_validate_block_ids_rejects_what_would_write_outside_a_ticket(ids: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_block_ids(ids, num_blocks=6)


def test_pack_names_a_mismatched_argument() -> None:
    layers = kv_pool(2, num_blocks=6)
    ids = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"must be torch.float32 \(2, 2, 2, 4, 2, 8\)"):
        pack_blocks(layers, ids, nan_staging(layers, 3))
    with pytest.raises(ValueError, match="must be torch.float32"):
        pack_blocks(layers, ids, nan_staging(layers, 2).half())
    with pytest.raises(ValueError, match="a group must match"):
        pack_blocks([layers[0], layers[1].half()], ids, nan_staging(layers, 2))
    with pytest.raises(ValueError, match="1-D int64"):
        pack_blocks(layers, ids.int(), nan_staging(layers, 2))
    with pytest.raises(ValueError, match="kv_layers is empty"):
        pack_blocks([], ids, nan_staging(layers, 2))


def test_reference_refuses_an_id_outside_the_pool() -> None:
    layers = kv_pool(1, num_blocks=4)
    with pytest.raises(RuntimeError, match="out of"):
        pack_blocks_ref(layers, torch.tensor([4]), nan_staging(layers, 1))


def test_copy_blocks_writes_exactly_the_named_blocks_of_another_pool() -> None:
    src = kv_pool(2, num_blocks=9, dtype=torch.float32)
    dst = [torch.zeros(2, 5, *layer.shape[2:]) for layer in src]
    copy_blocks(src, torch.tensor([8, 1]), dst, torch.tensor([0, 4]), use_triton=False)
    for mine, layer in zip(dst, src, strict=True):
        assert same_bytes(mine[:, [0, 4]], layer[:, [8, 1]])
        assert not mine[:, 1:4].any()


def test_copy_blocks_names_a_mismatched_argument() -> None:
    src = kv_pool(2, num_blocks=9, dtype=torch.float32)
    dst = [torch.zeros(2, 5, 16, 2, 4, dtype=torch.bfloat16) for _ in src]
    with pytest.raises(ValueError, match="destination blocks torch.bfloat16"):
        copy_blocks(src, torch.tensor([1]), dst, torch.tensor([0]))
    with pytest.raises(ValueError, match="2 source block ids but 1 destination"):
        copy_blocks(src, torch.tensor([1, 2]), src, torch.tensor([0]))


def test_triton_kernel_matches_reference_in_interpreter() -> None:
    pytest.importorskip("triton")
    run_in_interpreter("interpreted_kv_pack.py")


@pytest.mark.gpu
@pytest.mark.parametrize("num_layers", [1, 3, 11])
def test_compiled_kernel_round_trips_llama_8b_blocks(num_layers: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layers = kv_pool(num_layers, 300, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")
    ids = torch.randperm(300, device="cuda")[:64]
    staging, want = nan_staging(layers, 64), nan_staging(layers, 64)
    receiver = [torch.full_like(layer, float("nan")) for layer in layers]

    pack_blocks(layers, ids, staging, use_triton=True)
    pack_blocks_ref(layers, ids, want)
    unpack_blocks(staging, receiver, ids.flip(0), use_triton=True)

    assert same_bytes(staging, want)
    for src, dst in zip(layers, receiver, strict=True):
        assert same_bytes(dst[:, ids.flip(0)], src[:, ids])
        assert int(torch.isnan(dst).flatten(2).all(-1).sum()) == 2 * (300 - 64)


class _Launcher:
    """Stands in for Triton's compiled kernel in a plan (CopyPlan.compiled): its launch raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        def launch(*args: object, stream: int) -> None:
            raise self.error

        return launch


@pytest.mark.gpu
def test_a_direct_launch_falls_back_on_a_launcher_convention_only_and_sets_the_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src, dst = kv_pool(3, 12, device="cuda"), kv_pool(3, 10, device="cuda", seed=1)
    plan = plan_copy(src, dst)
    src_ids, dst_ids = torch.tensor([7, 2, 9], device="cuda"), torch.tensor([0, 5, 3], device="cuda")
    launch_copy(plan, src_ids, dst_ids)  # the JIT launch, which keeps the compiled kernel
    assert plan.compiled
    compiled = plan.compiled
    if torch.cuda.device_count() > 1:  # launched from a thread whose current device is another GPU
        for kv in dst:
            kv.zero_()
        with torch.cuda.device(1):
            launch_copy(plan, src_ids, dst_ids)
        torch.cuda.synchronize(0)
        assert plan.compiled is compiled  # launched directly, not fallen back to the JIT
        for s, d in zip(src, dst, strict=True):
            assert same_bytes(d[:, [0, 5, 3]], s[:, [7, 2, 9]])

    plan.compiled = _Launcher(RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a CUDA error is no launcher convention
        launch_copy(plan, src_ids, dst_ids)
    assert plan.compiled is not False

    plan.compiled = _Launcher(TypeError("launch() takes 17 positional arguments but 18 were given"))
    for kv in dst:
        kv.zero_()
    launch_copy(plan, src_ids, dst_ids)  # another Triton's launcher: the JIT launch copies instead
    torch.cuda.synchronize()
    assert plan.compiled is False
    for s, d in zip(src, dst, strict=True):
        assert same_bytes(d[:, [0, 5, 3]], s[:, [7, 2, 9]])
