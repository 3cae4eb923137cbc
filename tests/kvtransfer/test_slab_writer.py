"""An offer's copy into a KV store's slots (kvtransfer.shm.SlabSink): the torch path of a CPU
worker, the slots a store may name wrongly, a writer whose launch is refused falling back to torch
copies, and the one-launch writer itself under Triton's interpreter (in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from slab_cases import SENTINEL, caches, in_a_minute, offer, slabs_like

from kvtransfer.shm import SlabSink
from kvtransfer.slab_writer import SlabWriter

HERE = Path(__file__).parent


def test_a_cpu_offer_copies_every_layer_into_its_slots() -> None:
    kv = caches(3, num_blocks=10)
    slabs = slabs_like(kv, num_slots=6)

    sink = offer(SlabSink(slabs, [4, 5, 0], in_a_minute()), kv, [7, 1, 3])

    assert sink.landed() and sink.event is None  # done when close returns
    for layer, slab in zip(kv, slabs, strict=True):
        assert torch.equal(slab[:, [4, 5, 0]], layer[:, [7, 1, 3]])


def test_slots_outside_the_arena_or_named_twice_fail_the_offer_before_anything_is_written() -> None:
    kv = caches(2, num_blocks=6)
    slabs = slabs_like(kv, num_slots=4)

    outside = offer(SlabSink(slabs, [3, 4], in_a_minute()), kv, [0, 1])
    twice = offer(SlabSink(slabs, [2, 2], in_a_minute()), kv, [0, 1])

    assert not outside.landed() and outside.failure == "the store named a slot outside its arena of 4"
    assert not twice.landed() and twice.failure == "the store named a slot twice"
    assert all((slab == SENTINEL).all() for slab in slabs)


def test_a_writer_whose_launch_is_refused_leaves_the_offer_to_torch_copies() -> None:
    # Outside the interpreter a compiled Triton kernel refuses CPU tensors (and without Triton the
    # plan cannot be made): the launch fails before anything is queued, the writer is disabled for
    # later offers, and this one is copied layer by layer all the same.
    kv = caches(2, num_blocks=6)
    slabs = slabs_like(kv, num_slots=4)
    writer = SlabWriter(slabs)

    sink = offer(SlabSink(slabs, [1, 2], in_a_minute(), writer), kv, [5, 0])

    assert sink.landed() and writer.disabled
    for layer, slab in zip(kv, slabs, strict=True):
        assert torch.equal(slab[:, [1, 2]], layer[:, [5, 0]])


def test_the_one_launch_writer_under_the_triton_interpreter() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpreted_slab_writer.py")]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"under the Triton interpreter:\n{result.stdout[-6000:]}{result.stderr[-3000:]}"
    assert "6 passed" in result.stdout, result.stdout[-2000:]  # run, not skipped
