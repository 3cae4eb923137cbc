"""A transport of any KV layout (what the KV store runs): workers of two layouts push blocks into
it, each into the caches of its own layout, and it pushes blocks back naming their layout. Data
whose connection agreed on another layout is refused, so two layouts never mix.

The test process plays the store; the workers are real processes (kv_peer), UCX over tcp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from kv_peer import SMOLLM2, Peer, PeerSpec, pattern, start_peers

from engine.kv_layout import KVLayout
from kvtransfer import KVCaches, KVTransport, TransportConfig

FLOAT32 = KVLayout(**SMOLLM2)
BFLOAT16 = replace(FLOAT32, dtype="bfloat16")
STORE_BLOCKS = 40


def caches_of(layout: KVLayout) -> KVCaches:
    shape = (2, STORE_BLOCKS, layout.block_size, layout.num_kv_heads, layout.head_dim)
    dtype = getattr(torch, layout.dtype)
    return KVCaches(layout, [torch.zeros(shape, dtype=dtype) for _ in range(layout.num_layers)])


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[KVTransport, Peer, Peer]]:
    """(the store's transport, a float32 worker, a bfloat16 worker)."""
    workers = start_peers(
        PeerSpec(SMOLLM2, 200), PeerSpec({**SMOLLM2, "dtype": "bfloat16"}, 200),
    )  # fmt: skip
    store = KVTransport(None, TransportConfig(ucx_tls="tcp,self", checksum_samples=4)).start()
    yield store, workers[0], workers[1]
    store.close()
    for worker in workers:
        worker.stop()


def landed_exactly(caches: KVCaches, blocks: list[int], seed: int) -> bool:
    ids = torch.tensor(blocks)
    for layer, kv in enumerate(caches.tensors):
        got = kv.index_select(1, ids)
        if not torch.equal(got.view(torch.int16), pattern(seed, layer, tuple(got.shape), got.dtype).view(torch.int16)):
            return False
    return True


def test_workers_of_two_layouts_push_into_caches_of_their_own_layout(world) -> None:
    store, f32, bf16 = world
    f32_caches, bf16_caches = caches_of(FLOAT32), caches_of(BFLOAT16)

    into_f32 = store.expect("f32-offer", [3, 9, 4], 48, timeout_s=30, caches=f32_caches)
    into_bf16 = store.expect("bf16-offer", [7, 1], 32, timeout_s=30, caches=bf16_caches)
    sent_f32 = f32.call("push", infos=[into_f32.ticket], seeds=[5], layers=None, timeout_s=30)
    sent_bf16 = bf16.call("push", infos=[into_bf16.ticket], seeds=[6], layers=None, timeout_s=30)

    assert sent_f32["tickets"]["f32-offer"]["ok"] and sent_bf16["tickets"]["bf16-offer"]["ok"]
    assert into_f32.wait(10).bytes == 3 * 30 * 2 * 16 * 3 * 64 * 4
    assert into_bf16.wait(10).bytes == 2 * 30 * 2 * 16 * 3 * 64 * 2
    assert landed_exactly(f32_caches, [3, 9, 4], seed=5)
    assert landed_exactly(bf16_caches, [7, 1], seed=6)


def test_a_worker_of_another_layout_is_refused_and_writes_nothing(world) -> None:
    store, _, bf16 = world
    f32_caches = caches_of(FLOAT32)

    into_f32 = store.expect("wrong-layout", [2, 5], 32, timeout_s=30, caches=f32_caches)
    sent = bf16.call("push", infos=[into_f32.ticket], seeds=[7], layers=None, timeout_s=30)

    assert not sent["tickets"]["wrong-layout"]["ok"]
    assert "KV layout differs" in str(sent["tickets"]["wrong-layout"]["error"])
    assert "dtype (ours 'float32', theirs 'bfloat16')" in str(into_f32.error())
    assert all(int(torch.count_nonzero(kv)) == 0 for kv in f32_caches.tensors)


def test_the_store_pushes_blocks_back_naming_their_layout(world) -> None:
    store, f32, _ = world
    f32_caches = caches_of(FLOAT32)
    blocks = [11, 0, 30, 8]
    ids = torch.tensor(blocks)
    for layer, kv in enumerate(f32_caches.tensors):
        kv.index_copy_(1, ids, pattern(9, layer, (2, len(blocks), *kv.shape[2:]), kv.dtype))

    ticket = f32.call("expect", ticket="fetch", num_tokens=64, seed=9, timeout_s=30)
    push = store.push(ticket, FLOAT32)
    for layer, kv in enumerate(f32_caches.tensors):
        push.push_layer(layer, kv, blocks, 64)
    push.close()

    assert push.wait(30).bytes == 4 * 30 * 2 * 16 * 3 * 64 * 4
    landed = f32.call("wait", tickets=["fetch"], timeout_s=30)
    assert landed["tickets"]["fetch"] == {"ok": True, "bytes": 4 * 30 * 2 * 16 * 3 * 64 * 4, "exact": True}
    assert landed["stray_writes"] == 0


def test_a_transport_of_any_layout_asks_which_layout_a_push_has(world) -> None:
    store, f32, _ = world
    ticket = f32.call("expect", ticket="unnamed", num_tokens=16, seed=0, timeout_s=5)
    with pytest.raises(ValueError, match="name the layout"):
        store.push(ticket)
    with pytest.raises(ValueError, match="name the caches"):
        store.expect("nowhere", [0], 16, timeout_s=5)
    f32.call("cancel", ticket="unnamed", reason="test over")
    f32.call("wait", tickets=["unnamed"], timeout_s=10)
