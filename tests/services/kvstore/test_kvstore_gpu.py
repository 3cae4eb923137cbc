"""The KV store as GPU workers meet it: 8 GiB of pinned memory, Llama-3.1-8B-shaped blocks (2 MiB
each, bf16) offered from and fetched into GPU memory, with `pdmesh up --device cuda`'s transports.

An H200 run found that no block ever landed: the store pinned its memory at the first offer, on
its event loop, for longer than the worker's offer deadline. Now the store is SERVING only once
its memory is pinned, and the first offer is answered within the worker's deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from store_process import SharedUser, StoreProcess, StoreUser, free_ports

from engine.kv_layout import KVLayout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LLAMA_8B = KVLayout("llama-8b-shaped", "bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)
OFFER_DEADLINE_S = 2.0  # a worker's kvstore_offer_timeout_ms
GiB = 1 << 30


@pytest.fixture(scope="module")
def store() -> Iterator[StoreProcess]:
    port, kv_port = free_ports()
    process = StoreProcess(port, kv_port, None, memory_bytes=8 * GiB, ucx_tls="cuda_copy,sm,tcp,self")
    yield process.start(timeout_s=300)  # SERVING once the 8 GiB are pinned
    process.stop()


def test_a_gpu_workers_blocks_land_in_the_store_and_come_back_byte_exact(store: StoreProcess) -> None:
    user = StoreUser(store.address, LLAMA_8B, device="cuda:0")
    try:
        hashes = user.chain(list(range(1000, 1000 + 32 * 16)))  # 32 blocks, 64 MiB
        assert user.offer(hashes, list(range(32)), timeout_s=OFFER_DEADLINE_S) == list(range(32))
        status = user.status()
        assert status.num_stored_blocks == 32 and status.memory_capacity_bytes == 8 * GiB
        assert status.memory_used_bytes == 32 * 2 * (1 << 20)

        generations = user.lookup(hashes)
        assert len(generations) == 32
        assert user.fetch(hashes, generations, into=list(range(32, 64)))
    finally:
        user.close()


def test_a_gpu_worker_on_the_stores_host_copies_through_the_mapped_memory(store: StoreProcess) -> None:
    """The same-host path: the worker maps the store's /dev/shm arena, registers it with CUDA, and
    blocks go between GPU memory and it, byte-exact: offers by one kernel launch writing the
    mapping, fetches by DMA copies. The rate is printed (the
    benchmark is bench/kv_store.py --phases turn2), not asserted."""
    user = SharedUser(store.address, LLAMA_8B, device="cuda:0")
    try:
        mapped = user.mapped(timeout_s=300)  # registering the 8 GiB mapping takes seconds
        assert mapped is not None and mapped.registered
        assert mapped.writer is not None  # registered mapped: offers are one kernel launch each
        hashes = user.chain(list(range(5000, 5000 + 64 * 16)))  # 64 blocks, 128 MiB
        assert user.offer(hashes, list(range(64)), lease_s=OFFER_DEADLINE_S * 5).wanted == list(range(64))
        generations = user.lookup_generations(hashes)
        assert len(generations) == 64
        started = time.perf_counter()
        assert user.fetch(hashes, generations, into=list(range(64)))
        took_s = time.perf_counter() - started
        print(f"shared-memory fetch of 128 MiB into GPU blocks: {took_s * 1000:.1f} ms, {0.128 / took_s:.1f} GB/s")
        assert user.status().num_leases == 0
    finally:
        user.close()
