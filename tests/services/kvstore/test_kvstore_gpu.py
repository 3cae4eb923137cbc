"""The KV store as GPU workers meet it: 8 GiB of pinned memory, Llama-3.1-8B-shaped blocks (2 MiB
each, bf16) offered from and fetched into GPU memory, with `pdmesh up --device cuda`'s transports.

An H200 run found that no block ever landed: the store pinned its memory at the first offer, on
its event loop, for longer than the worker's offer deadline. Now the store is SERVING only once
its memory is pinned, and the first offer is answered within the worker's deadline.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from store_process import StoreProcess, StoreUser, free_ports

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
