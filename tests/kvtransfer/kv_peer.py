"""A worker process for the transfer tests: a KVTransport over its own KV pool, driven through a pipe.

The test process starts peers with `start_peers(...)` (multiprocessing, spawn) and sends commands;
each peer runs the transport as a worker would, its command loop standing in for the engine's step
thread (push_layer, done()/error()). Blocks come from the engine's BlockPool, shuffled so that a
request's blocks lie scattered over the pool, and are released the way the engine releases them:
when a ticket completes (after its bytes are checked) or reports an error. Released blocks are
zeroed, so any write outside a ticket's blocks shows up as a non-zero free block.

Payloads are a pattern derived from (seed, layer), so a receiver checks every byte it got without
being told what was sent.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch

PEER_STARTUP_S = 60.0
SMOLLM2 = {  # SmolLM2-135M's KV shape, float32 as on a CPU worker
    "model_fingerprint": "smollm2-135m",
    "dtype": "float32",
    "block_size": 16,
    "num_layers": 30,
    "num_kv_heads": 3,
    "head_dim": 64,
}


@dataclass(frozen=True)
class PeerSpec:
    layout: dict[str, Any]  # KVLayout fields
    pool_blocks: int
    receive: bool = True
    port: int = 0
    checksum_samples: int = 4
    message_bytes: int = 8 << 20
    device: str = "cpu"
    ucx_tls: str = "tcp,self"
    host: str = "127.0.0.1"  # the address the peer advertises
    loopback_only: bool | None = None
    direct_writes: bool = True  # GPU peers of one host: the sender writes the receiver's blocks over CUDA IPC
    side_channel: bool = True  # direct writes' messages over a same-host Unix socket (kvtransfer/side.py)


def pattern(seed: int, layer: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A deterministic payload of `shape` (2, n, block_size, kv_heads, head_dim): every block's words
    differ from each other and from every other (seed, layer, K/V, block position)'s."""
    chunks = shape[0] * shape[1]  # one block's K or V each
    words = torch.Size(shape[2:]).numel() * dtype.itemsize // 4
    base = torch.randint(0, 2**30, (words,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    offsets = (torch.arange(chunks, dtype=torch.int64) * 7919 + layer * 1_000_003 + seed * 998_244_353) % 2**30
    return (base[None, :] + offsets.to(torch.int32)[:, None]).view(dtype).view(shape)


class Peer:
    """The test side of one peer process."""

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.address = ""

    def call(self, command: str, *, reply_within_s: float = 60.0, **args: Any) -> Any:
        self.conn.send((command, args))
        return self._reply(reply_within_s)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(EOFError, OSError, RuntimeError, TimeoutError):
                self.call("quit", reply_within_s=30)
            self.process.join(30)
        if self.process.is_alive():
            self.kill()

    def _reply(self, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"the peer did not answer within {timeout_s} s")
        try:
            ok, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the peer process died (exit code {self.process.exitcode})") from None
        if not ok:
            raise RuntimeError(f"peer command failed: {value}")
        return value


def outside_address() -> str | None:
    """An address of this machine that is not loopback (the one its default route leaves by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, only a route chosen
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def start_peers(*specs: PeerSpec) -> list[Peer]:
    """Start one process per spec, all at once; each answers with its listener address when ready."""
    ctx = multiprocessing.get_context("spawn")
    peers = []
    for spec in specs:
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_main, args=(theirs, spec), daemon=True)
        process.start()
        theirs.close()
        peers.append(Peer(process, ours))
    for peer in peers:
        peer.address = peer._reply(PEER_STARTUP_S)
    return peers


@dataclass
class _Observed:
    completed: list[Any] = field(default_factory=list)
    failed: list[Any] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # tickets whose lease ran out uncommitted

    def on_complete(self, stats: Any) -> None:
        self.completed.append(stats)

    def on_failure(self, error: Any, direction: Any) -> None:
        self.failed.append((error, direction))


@dataclass
class _Worker:
    """The peer process's state: a transport, its KV pool, and the tickets in flight."""

    spec: PeerSpec
    transport: Any
    caches: list[torch.Tensor]
    pool: Any  # engine.block_pool.BlockPool
    observed: _Observed
    held: dict[str, list[int]] = field(default_factory=dict)  # ticket -> blocks
    seeds: dict[str, int] = field(default_factory=dict)
    imports: dict[str, Any] = field(default_factory=dict)
    pushes: dict[str, Any] = field(default_factory=dict)

    def allocate(self, ticket: str, num_tokens: int) -> list[int]:
        blocks = [int(b) for b in self.pool.allocate(-(-num_tokens // self.spec.layout["block_size"]))]
        self.held[ticket] = blocks
        return blocks

    def release(self, ticket: str) -> None:
        blocks = self.held.pop(ticket)
        ids = torch.tensor(blocks, device=self.spec.device)
        for kv in self.caches:
            kv.index_fill_(1, ids, 0)
        self.pool.free(blocks)

    def observations(self) -> dict[str, Any]:
        return {"completed": self.observed.completed, "failed": self.observed.failed, "expired": self.observed.expired}

    def cancel(self, ticket: str, reason: str) -> None:
        (self.pushes.get(ticket) or self.imports[ticket]).cancel(reason)

    # ---- receiving side
    def expect(self, ticket: str, num_tokens: int, seed: int, timeout_s: float) -> Any:
        blocks = self.allocate(ticket, num_tokens)
        self.seeds[ticket] = seed
        self.imports[ticket] = self.transport.expect(
            ticket, blocks, num_tokens, timeout_s, on_expire=lambda imp: self.observed.expired.append(imp.ticket_id)
        )
        return self.imports[ticket].ticket

    def commit(self, ticket: str) -> bool:
        """The engine takes the ticket's blocks over (what Decode.Generate does)."""
        return bool(self.imports[ticket].commit())

    def wait(self, tickets: list[str], timeout_s: float, check_strays: bool = True) -> dict[str, Any]:
        """Wait for each ticket like the engine does (done() or error()), check it, free its blocks."""
        results = {}
        for ticket in tickets:
            imp = self.imports.pop(ticket)
            started = time.monotonic()
            try:
                stats = imp.wait(timeout_s)
                results[ticket] = {"ok": imp.done(), "bytes": stats.bytes, "exact": self._exact(ticket)}
            except Exception as e:
                results[ticket] = {"ok": False, "error": imp.error() or e, "after_s": time.monotonic() - started}
            self.release(ticket)
        strays = self._stray_writes() if check_strays else None
        return {"tickets": results, "free_blocks": self.pool.num_free, "stray_writes": strays}

    def status(self, ticket: str) -> dict[str, Any]:
        imp = self.imports[ticket]
        return {"layers_ready": imp.num_layers_ready, "done": imp.done(), "error": imp.error(), "sender": imp.sender}

    def _exact(self, ticket: str) -> bool:
        ids = torch.tensor(self.held[ticket], device=self.spec.device)
        for layer, kv in enumerate(self.caches):
            got = kv.index_select(1, ids).cpu()
            want = pattern(self.seeds[ticket], layer, tuple(got.shape), got.dtype)
            if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                return False
        return True

    def _stray_writes(self) -> int:
        """Non-zero elements in blocks no ticket holds."""
        free = torch.ones(self.spec.pool_blocks, dtype=torch.bool, device=self.spec.device)
        free[[b for blocks in self.held.values() for b in blocks]] = False
        return sum(int(torch.count_nonzero(kv, dim=(0, 2, 3, 4))[free].sum()) for kv in self.caches)

    # ---- sending side
    def open(self, infos: list[Any]) -> None:
        """Open pushes without pushing: a prefill that arrived and waits in the engine's queue."""
        for info in infos:
            self.pushes[info.ticket_id] = self.transport.push(info)

    def push(self, infos: list[Any], seeds: list[int], layers: int | None, timeout_s: float) -> dict[str, Any]:
        """Push every ticket layer by layer, interleaved as one engine step would; `layers` stops early."""
        work = []
        for info, seed in zip(infos, seeds, strict=True):
            blocks = self.allocate(info.ticket_id, info.num_tokens)
            ids = torch.tensor(blocks, device=self.spec.device)
            for layer, kv in enumerate(self.caches):
                payload = pattern(seed, layer, (2, len(blocks), *kv.shape[2:]), kv.dtype)
                kv.index_copy_(1, ids, payload.to(kv.device))
            self.pushes[info.ticket_id] = self.pushes.get(info.ticket_id) or self.transport.push(info)
            work.append((self.pushes[info.ticket_id], blocks, info.num_tokens))
        started = time.monotonic()
        for layer in range(len(self.caches) if layers is None else layers):
            for push, blocks, num_tokens in work:
                push.push_layer(layer, self.caches[layer], blocks, num_tokens)
        if layers is not None:
            return {"pushed_layers": layers}
        for push, _, _ in work:
            push.close()
        result = self.wait_push([info.ticket_id for info in infos], timeout_s)
        result["seconds"] = time.monotonic() - started
        return result

    def preconnect(self, peers: list[str]) -> None:
        self.transport.preconnect(peers)

    def connections(self) -> dict[str, Any]:
        """The transport's dialed connections: the peers open now, dials ever made, how many of
        those preconnect() opened, and how many carry a side channel."""
        t = self.transport
        return {"peers": t.peers, "dials": t.dials, "preconnected": t.preconnected, "side_channels": t.side_channels}

    def direct_state(self, ticket: str) -> str | None:
        """How an open push's layers travel: None (over UCX), or its direct writes' state (direct.py)."""
        return _direct_state(self.pushes[ticket])

    def wait_push(self, tickets: list[str], timeout_s: float) -> dict[str, Any]:
        results = {}
        for ticket in tickets:
            push = self.pushes.pop(ticket)
            started = time.monotonic()
            try:
                stats = push.wait(timeout_s)
                results[ticket] = {"ok": True, "bytes": stats.bytes}
                if push.direct is not None:  # the receiver's cache was mapped: written directly, or not in time
                    results[ticket]["direct"] = _direct_state(push) == "armed"
            except Exception as e:
                results[ticket] = {"ok": False, "error": e, "after_s": time.monotonic() - started}
            self.release(ticket)
        # A message's staging buffer goes back when UCX reports its send complete, which can come
        # just after the receiver's Done: wait for that, so the next push can reuse it.
        pool = self.transport.sender.pool
        deadline = time.monotonic() + 5.0
        while pool.in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        peak = sum(pool.peak_in_use.values())
        return {"tickets": results, "staging_allocations": pool.allocations, "staging_peak": peak}


def _direct_state(push: Any) -> str | None:
    return None if push.direct is None else str(push.direct.state.value)


def _main(conn: Connection, spec: PeerSpec) -> None:
    torch.set_num_threads(1)
    from engine.block_pool import BlockPool
    from engine.kv_layout import KVLayout
    from kvtransfer import KVTransport, TransportConfig

    layout = KVLayout(**spec.layout)
    shape = (2, spec.pool_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    caches = [
        torch.zeros(shape, dtype=getattr(torch, layout.dtype), device=spec.device) for _ in range(layout.num_layers)
    ]
    pool = BlockPool(spec.pool_blocks)
    shuffled = pool.allocate(spec.pool_blocks)
    random.Random(spec.pool_blocks).shuffle(shuffled)
    pool.free(shuffled)  # later allocations come back in this scattered order
    config = TransportConfig(
        host=spec.host, port=spec.port, device=spec.device, ucx_tls=spec.ucx_tls,
        checksum_samples=spec.checksum_samples, message_bytes=spec.message_bytes, loopback_only=spec.loopback_only,
        direct_writes=spec.direct_writes, side_channel=spec.side_channel,
    )  # fmt: skip
    observed = _Observed()
    transport = KVTransport(layout, config, kv_caches=caches if spec.receive else None, observer=observed).start()
    worker = _Worker(spec, transport, caches, pool, observed)
    conn.send((True, transport.address))
    try:
        while True:
            command, args = conn.recv()
            if command == "quit":
                break
            try:
                conn.send((True, getattr(worker, command)(**args)))
            except Exception as e:
                conn.send((False, f"{type(e).__name__}: {e}"))
    finally:
        transport.close()
        conn.send((True, None))
