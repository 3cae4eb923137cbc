"""Staging buffers are pooled: a steady stream of transfers allocates nothing after the first."""

from __future__ import annotations

import torch

from kvtransfer.staging import StagingPool


def test_a_released_buffer_serves_the_next_message_of_its_size_class() -> None:
    pool = StagingPool(torch.device("cpu"), retain_bytes=64 << 20)
    first = pool.acquire(3 << 20)  # a 4 MiB class buffer
    pool.release(first)

    second = pool.acquire((3 << 20) + 12345)

    assert second.buffer.data_ptr() == first.buffer.data_ptr()
    assert second.data.numel() == (3 << 20) + 12345
    assert pool.allocations == 1


def test_buffers_in_use_are_never_handed_out_twice() -> None:
    pool = StagingPool(torch.device("cpu"), retain_bytes=64 << 20)

    a, b = pool.acquire(1 << 20), pool.acquire(1 << 20)

    assert a.buffer.data_ptr() != b.buffer.data_ptr()
    assert pool.allocations == 2


def test_the_pool_keeps_no_more_free_memory_than_it_may_retain() -> None:
    pool = StagingPool(torch.device("cpu"), retain_bytes=8 << 20)
    buffers = [pool.acquire(4 << 20) for _ in range(3)]

    for staging in buffers:
        pool.release(staging)

    assert pool.free_bytes == 8 << 20  # the third is dropped


def test_a_staging_buffer_views_as_the_packed_kv_shape() -> None:
    pool = StagingPool(torch.device("cpu"), retain_bytes=0)
    staging = pool.acquire(2 * 2 * 3 * 16 * 8 * 128 * 2)

    view = staging.view(torch.bfloat16, (2, 2, 3, 16, 8, 128))

    assert view.is_contiguous() and view.data_ptr() == staging.buffer.data_ptr()


def test_the_pool_allocates_only_past_the_most_buffers_of_a_class_ever_in_use() -> None:
    pool = StagingPool(torch.device("cpu"), retain_bytes=64 << 20)
    burst = [pool.acquire(1 << 20) for _ in range(3)] + [pool.acquire(5 << 20)]
    for staging in burst:
        pool.release(staging)

    again = [pool.acquire(1 << 20) for _ in range(2)] + [pool.acquire(5 << 20), pool.acquire(5 << 20)]

    assert dict(pool.peak_in_use) == {1 << 20: 3, 8 << 20: 2}
    assert pool.allocations == sum(pool.peak_in_use.values()) == 5  # only the second 8 MiB buffer is new
    assert pool.in_use == len(again)
