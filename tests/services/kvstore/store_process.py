"""A KV store as a real process (`pdmesh serve kvstore`), and a worker's side of it in the test
process: a KV transport over a small paged cache, with the calls a worker makes (offer and push,
lookup, fetch into its own blocks); SharedUser makes them through the store's memory mapped from
/dev/shm instead."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.block_copy import copy_in
from engine.block_hash import chain_hashes
from engine.config import EngineConfig
from engine.ids import BlockHash
from engine.kv_layout import KVLayout
from kvtransfer import KVTransport
from kvtransfer.shm import SlabSink
from pdmesh.convert import layout_to_pb
from pdmesh.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.worker.config import WorkerConfig
from services.worker.convert import ticket_from_pb, ticket_to_pb
from services.worker.shared_memory import MappedArena, SharedMemoryLink
from services.worker.store_client import SharedOffered, StoreClient

ROOT = Path(__file__).resolve().parents[3]
LAYOUT = KVLayout("store-test-model", "float32", block_size=4, num_layers=3, num_kv_heads=2, head_dim=16)
BLOCK_BYTES = 3 * 2 * 4 * 2 * 16 * 4  # 1536
_SERVING = health_pb2.HealthCheckResponse.SERVING
T = TypeVar("T")
TOKENS_KILLED = list(range(500, 516))  # 4 blocks: 2 a killed worker fetches, 2 it offers (shm_worker.py)


@dataclass
class StoreProcess:
    port: int
    kv_port: int
    disk: Path | None
    memory_bytes: int
    disk_bytes: int = 1 << 20
    ucx_tls: str = "tcp,self"  # the store's KV transports (a GPU user's need cuda_copy: kvstore/config.py)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60) -> StoreProcess:
        argv = [
            sys.executable, "-m", "pdmesh", "serve", "kvstore", "--port", str(self.port),
            "--kv-port", str(self.kv_port), "--scheduler", "",
        ]  # fmt: skip
        if self.disk is not None:
            argv += ["--disk-path", str(self.disk)]
        env = {
            **os.environ, "PYTHONUNBUFFERED": "1", "PDMESH_KVSTORE_MEMORY_BYTES": str(self.memory_bytes),
            "PDMESH_KVSTORE_DISK_BYTES": str(self.disk_bytes), "PDMESH_KVSTORE_UCX_TLS": self.ucx_tls,
        }  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env)
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, "the store exited during start-up"
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == _SERVING:
                        return self
                time.sleep(0.1)
        raise TimeoutError("the store did not serve")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def free_ports() -> tuple[int, int]:
    base = random.randrange(20000, 40000, 10)
    return base, base + 1


def value_of(block_hash: int, layer: int) -> float:
    return float(block_hash % 9973) + layer / 8


class StoreUser:
    """A worker's side: its own KV pool (64 blocks), its transport, and a channel to the store.
    On a GPU (`device` "cuda:0") the pool and the transport are a GPU worker's."""

    def __init__(self, store_address: str, layout: KVLayout = LAYOUT, device: str = "cpu") -> None:
        self.layout = layout
        shape = (2, 64, layout.block_size, layout.num_kv_heads, layout.head_dim)
        dtype = getattr(torch, layout.dtype)
        self.caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        config = WorkerConfig(engine=EngineConfig(device=device)).transport()  # a worker's, on a free port
        self.transport = KVTransport(layout, config, self.caches).start()
        self.channel = grpc.insecure_channel(store_address)
        self.stub = kvstore_pb2_grpc.KVStoreStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.transport.close()

    def chain(self, tokens: list[int]) -> list[BlockHash]:
        return chain_hashes(tokens, self.layout.block_size, self.layout.model_fingerprint)

    def offer(self, hashes: list[BlockHash], blocks: list[int], timeout_s: float | None = None) -> list[int]:
        """Fill `blocks` with each hash's values, offer, push what is wanted; the positions wanted."""
        for block_hash, block in zip(hashes, blocks, strict=True):
            for layer, kv in enumerate(self.caches):
                kv[:, block] = value_of(block_hash, layer)
        request = kvstore_pb2.OfferRequest(kv_layout=layout_to_pb(self.layout), block_hashes=hashes)
        reply = self.stub.Offer(request, timeout=timeout_s)
        wanted = list(reply.wanted)
        if wanted:
            push = self.transport.push(ticket_from_pb(reply.ticket))
            ids = [blocks[i] for i in wanted]
            for layer, kv in enumerate(self.caches):
                push.push_layer(layer, kv, ids, len(ids) * self.layout.block_size)
            push.close()
            push.wait(30)
        return wanted

    def lookup(self, hashes: list[BlockHash], layout: KVLayout | None = None) -> list[int]:
        request = kvstore_pb2.LookupRequest(kv_layout=layout_to_pb(layout or self.layout), block_hashes=hashes)
        return list(self.stub.Lookup(request).generations)

    def fetch(self, hashes: list[BlockHash], generations: list[int], into: list[int]) -> bool:
        """Fetch into `into`; True when every block landed holding its hash's values."""
        for kv in self.caches:
            kv[:, into] = 0
        imported = self.transport.expect(f"fetch-{random.getrandbits(40)}", into,
                                         len(into) * self.layout.block_size, timeout_s=30)  # fmt: skip
        imported.commit()
        request = kvstore_pb2.FetchRequest(
            kv_layout=layout_to_pb(self.layout), block_hashes=hashes, generations=generations,
            ticket=ticket_to_pb(imported.ticket),
        )  # fmt: skip
        try:
            self.stub.Fetch(request, timeout=30)
        except grpc.RpcError:
            imported.cancel("the fetch failed")
            raise
        imported.wait(30)
        return all(
            bool((kv[:, block] == value_of(h, layer)).all())
            for h, block in zip(hashes, into, strict=True)
            for layer, kv in enumerate(self.caches)
        )

    def status(self) -> kvstore_pb2.KVStoreStatus:
        return self.stub.GetStatus(kvstore_pb2.GetStatusRequest())


class SharedUser:
    """A worker's side over shared memory: its own KV pool, the worker's StoreClient and
    SharedMemoryLink (mapping the store's /dev/shm file), and the copies a worker makes
    (kvtransfer.shm.SlabSink for offers, engine.block_copy.copy_in for fetches)."""

    def __init__(self, store_address: str, layout: KVLayout = LAYOUT, device: str = "cpu") -> None:
        self.layout = layout
        shape = (2, 64, layout.block_size, layout.num_kv_heads, layout.head_dim)
        dtype = getattr(torch, layout.dtype)
        self.caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        self.loop = asyncio.new_event_loop()
        self.client = StoreClient(layout, 10, 10)
        self.run(self._point_at(store_address))  # its grpc.aio channel belongs to this loop
        self.link = SharedMemoryLink(self.client, self.caches)
        self.channel = grpc.insecure_channel(store_address)

    def status(self) -> kvstore_pb2.KVStoreStatus:
        return kvstore_pb2_grpc.KVStoreStub(self.channel).GetStatus(kvstore_pb2.GetStatusRequest())

    async def _point_at(self, address: str) -> None:
        self.client.point_at(address)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.run(self.link.close())
        self.run(self.client.close())
        self.loop.close()
        self.channel.close()

    def mapped(self, timeout_s: float = 30) -> MappedArena | None:
        """The store's memory once mapped; None if the link gave up on it (another host)."""
        return self.run(self._mapped(timeout_s))

    async def _mapped(self, timeout_s: float) -> MappedArena | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            mapped = self.link.acquire()
            if mapped is not None:
                self.link.release(mapped)
                return mapped
            if self.link.gave_up:
                return None
            await asyncio.sleep(0.05)
        raise TimeoutError("the store's memory was never mapped")

    def offer(
        self, hashes: list[BlockHash], blocks: list[int], lease_s: float = 10, commit: bool = True
    ) -> SharedOffered:
        """Fill `blocks` with each hash's values, offer, write what is wanted into its slots, commit."""
        mapped = self.mapped()
        assert mapped is not None
        for block_hash, block in zip(hashes, blocks, strict=True):
            for layer, kv in enumerate(self.caches):
                kv[:, block] = value_of(block_hash, layer)
        offered = self.run(self.client.offer_shared(hashes, mapped.info.arena_id, lease_s))
        if offered.wanted:
            sink = SlabSink(mapped.slabs, offered.slots, time.monotonic() + lease_s, mapped.writer)
            ids = [blocks[i] for i in offered.wanted]
            for layer, kv in enumerate(self.caches):
                sink.push_layer(layer, kv, ids, len(ids) * self.layout.block_size)
            sink.close()
            sink.wait()
            if commit:
                assert self.run(self.client.commit_offer(offered.lease_id, sink.landed()))
        return offered

    def chain(self, tokens: list[int]) -> list[BlockHash]:
        return chain_hashes(tokens, self.layout.block_size, self.layout.model_fingerprint)

    def lookup_generations(self, hashes: list[BlockHash]) -> list[int]:
        return self.run(self.client.lookup(hashes))

    def pin(self, hashes: list[BlockHash], generations: list[int], lease_s: float = 10) -> tuple[list[int], str]:
        mapped = self.mapped()
        assert mapped is not None
        return self.run(self.client.fetch_shared(hashes, generations, mapped.info.arena_id, lease_s))

    def fetch(self, hashes: list[BlockHash], generations: list[int], into: list[int]) -> bool:
        """Copy the blocks into `into`; True when the store held them throughout and every block
        holds its hash's values."""
        mapped = self.mapped()
        assert mapped is not None
        for kv in self.caches:
            kv[:, into] = 0
        slots, lease_id = self.pin(hashes, generations)
        event = copy_in(self.caches, into, mapped.slabs, slots)
        if event is not None:
            event.synchronize()
        held = self.run(self.client.release_fetch(lease_id, len(hashes)))
        return held and all(
            bool((kv[:, block] == value_of(h, layer)).all())
            for h, block in zip(hashes, into, strict=True)
            for layer, kv in enumerate(self.caches)
        )
