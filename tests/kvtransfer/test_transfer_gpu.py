"""Two worker processes on one GPU exchange KV straight from device memory (UCX cuda_ipc)."""

from __future__ import annotations

import pytest
import torch
from kv_peer import SMOLLM2, PeerSpec, start_peers

pytestmark = pytest.mark.gpu

CUDA_TLS = "cuda_ipc,cuda_copy,sm,tcp,self"
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 2  # one block, every layer, K and V, bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("checksum_samples", [8, 0], ids=["checksums-on-scatter-thread", "checksums-off-on-loop"])
def test_concurrent_requests_land_exact_in_scattered_device_blocks(checksum_samples: int) -> None:
    # With checksums the receiver verifies and unpacks on its scatter thread; without, the loop
    # launches the unpack and the sender sends each header before its pack has finished.
    layout = {**SMOLLM2, "dtype": "bfloat16"}
    decode, prefill = start_peers(
        PeerSpec(layout, 600, device="cuda:0", ucx_tls=CUDA_TLS, checksum_samples=checksum_samples),
        PeerSpec(layout, 600, receive=False, device="cuda:0", ucx_tls=CUDA_TLS, checksum_samples=checksum_samples),
    )
    try:
        tickets = {f"gpu-{i}": 1000 - 13 * i for i in range(8)}
        infos = [
            decode.call("expect", ticket=t, num_tokens=n, seed=i, timeout_s=60)
            for i, (t, n) in enumerate(tickets.items())
        ]

        sent = prefill.call("push", infos=infos, seeds=list(range(8)), layers=None, timeout_s=60)
        landed = decode.call("wait", tickets=list(tickets), timeout_s=60)

        assert all(r["ok"] for r in sent["tickets"].values())
        assert {t: (r["ok"], r["exact"]) for t, r in landed["tickets"].items()} == {t: (True, True) for t in tickets}
        assert landed["tickets"]["gpu-0"]["bytes"] == 63 * BLOCK_BYTES
        assert landed["free_blocks"] == 600
        assert landed["stray_writes"] == 0
    finally:
        decode.stop()
        prefill.stop()
