"""An offer written by the one-launch writer (kvtransfer.slab_writer) under TRITON_INTERPRET=1, on
CPU tensors standing for the caches and the arena as the device addresses it.

Run by test_slab_writer.py in a subprocess (the file name keeps pytest from collecting it in the
main process, where the interpreter switch is off).
"""

from __future__ import annotations

import time

import pytest
import torch
from slab_cases import SENTINEL, caches, in_a_minute, offer, slabs_like

from kernels._triton import interpreter_active
from kvtransfer.shm import SlabSink
from kvtransfer.slab_writer import SlabWriter

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_one_launch_writes_every_layer_of_each_block_into_its_slot(dtype: torch.dtype) -> None:
    kv = caches(3, num_blocks=12, dtype=dtype)
    slabs = slabs_like(kv, num_slots=9)
    writer = SlabWriter(slabs)
    blocks, slots = [9, 2, 11, 5], [6, 0, 1, 2]  # scattered blocks into runs of slots, out of order

    sink = offer(SlabSink(slabs, slots, in_a_minute(), writer), kv, blocks)

    assert sink.landed() and not writer.disabled
    untouched = [s for s in range(9) if s not in slots]
    for layer, slab in zip(kv, slabs, strict=True):
        assert torch.equal(slab[:, slots], layer[:, blocks])
        assert (slab[:, untouched] == SENTINEL).all()


def test_a_second_offer_reuses_the_plan_and_an_odd_count_still_lands() -> None:
    kv = caches(2, num_blocks=8)
    slabs = slabs_like(kv, num_slots=8)
    writer = SlabWriter(slabs)
    offer(SlabSink(slabs, [0, 1], in_a_minute(), writer), kv, [3, 4])
    plan = writer._plan

    sink = offer(SlabSink(slabs, [7, 3, 5], in_a_minute(), writer), kv, [0, 6, 1])

    assert sink.landed() and writer._plan is plan
    for layer, slab in zip(kv, slabs, strict=True):
        assert torch.equal(slab[:, [0, 1, 7, 3, 5]], layer[:, [3, 4, 0, 6, 1]])


def test_nothing_is_written_once_the_deadline_has_passed() -> None:
    kv = caches(2, num_blocks=6)
    slabs = slabs_like(kv, num_slots=4)

    sink = offer(SlabSink(slabs, [0, 1], time.monotonic() - 0.001, SlabWriter(slabs)), kv, [2, 3])

    assert not sink.landed() and sink.failure is not None and "lease ran out" in sink.failure
    assert all((slab == SENTINEL).all() for slab in slabs)


def test_a_cancelled_export_writes_nothing() -> None:
    kv = caches(2, num_blocks=6)
    slabs = slabs_like(kv, num_slots=4)
    sink = SlabSink(slabs, [0, 1], in_a_minute(), SlabWriter(slabs))
    sink.push_layer(0, kv[0], [2, 3], 8)

    sink.cancel("a block left the prefix cache before it was exported")
    sink.close()

    assert not sink.landed()
    assert all((slab == SENTINEL).all() for slab in slabs)


def test_prepare_plans_for_the_caches_and_writes_nothing() -> None:
    kv = caches(2, num_blocks=6)
    slabs = slabs_like(kv, num_slots=4)
    writer = SlabWriter(slabs)

    writer.prepare(kv)
    plan = writer._plan

    assert plan is not None and all((slab == SENTINEL).all() for slab in slabs)
    assert offer(SlabSink(slabs, [3], in_a_minute(), writer), kv, [5]).landed() and writer._plan is plan
    assert all(torch.equal(slab[:, [3]], layer[:, [5]]) for layer, slab in zip(kv, slabs, strict=True))
