"""What a closed KVTransport leaves behind: nothing of its own. Its caches are the engine's KV
memory (on a GPU, what torch's CUDA IPC shares are made from: RELIABILITY.md), so a transport kept
alive after close() keeps them into interpreter shutdown. A real peer process over UCX/tcp."""

from __future__ import annotations

import gc
import weakref

import torch
from kv_peer import start_peers
from test_failures import POOL, SMALL, eventually, spec

from engine.kv_layout import KVLayout
from kvtransfer import KVTransport, TransportConfig


def _open_lose_and_close() -> tuple[weakref.ref[KVTransport], weakref.ref[torch.Tensor]]:
    """A receiving transport connected to a peer that is then SIGKILLed, closed once it saw the
    loss; weak references to the transport and to one of its caches."""
    layout = KVLayout(**SMALL)
    caches = [torch.zeros(2, POOL, layout.block_size, layout.num_kv_heads, layout.head_dim) for _ in range(8)]
    transport = KVTransport(layout, TransportConfig(ucx_tls="tcp,self"), caches).start()
    (peer,) = start_peers(spec())
    try:
        transport.preconnect([peer.address])
        eventually(lambda: transport.peers == [peer.address], within_s=30)
        peer.kill()
        eventually(lambda: transport.peers == [], within_s=30)  # UCX saw the peer go
    finally:
        transport.close()
        peer.stop()
    return weakref.ref(transport), weakref.ref(caches[0])


def test_a_closed_transport_and_its_caches_are_collected_after_a_lost_connection() -> None:
    transport, cache = _open_lose_and_close()
    gc.collect()
    assert transport() is None, "the closed transport is still referred to"
    assert cache() is None, "the caches it was given are still referred to"
