"""The two worker processes of bench/kv_transfer.py: each a KVTransport with its own scattered KV
pool in Llama-3.1-8B dims, driven from the parent over a pipe by (command, args) pairs (expect,
wait, fill, push, sums, timeline, quit); `Worker` is the parent's handle on one. Times are
time.monotonic_ns() stamps, one clock for every process of the host, so the parent subtracts a
sender's stamp from a receiver's.

Not a test. Each process sees the GPUs the parent names (CUDA_VISIBLE_DEVICES, read at its CUDA
init) and imports kvtransfer, so ucxx loads in the workers only, never in the parent.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import time
import traceback
from typing import Any

import torch

from engine.kv_layout import KVLayout

LAYOUT = KVLayout("llama-3.1-8b", "bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)
REPLY_S = 300.0


def worker_main(
    conn: Any, role: str, device: str, pool_blocks: int, tls: str, message_bytes: int, options: dict[str, Any]
) -> None:
    """A sending or receiving worker with its own scattered KV pool, driven by (command, args) pairs."""
    try:
        torch.set_num_threads(2)
        from kvtransfer import KVTransport, TransportConfig
        from kvtransfer.config import ProgressMode

        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        shape = (2, pool_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
        caches = [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in range(LAYOUT.num_layers)]
        order = torch.randperm(pool_blocks, generator=torch.Generator().manual_seed(0 if role == "recv" else 1))
        config = TransportConfig(
            direct_writes=options["direct_writes"],
            side_channel=options["side_channel"],
            device=device,
            ucx_tls=tls,
            message_bytes=message_bytes,
            progress=None if options["progress"] == "auto" else ProgressMode(options["progress"]),
            delayed_submission=options["delayed_submission"],
            record_timeline=options["timeline"],
        )
        transport = KVTransport(LAYOUT, config, kv_caches=caches if role == "recv" else None).start()
        conn.send(("ok", transport.address))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    imports: dict[str, Any] = {}
    landed: dict[str, int] = {}  # ticket -> time.monotonic_ns() when its import resolved (on the transport's loop)
    try:
        while True:
            command, args = conn.recv()
            if command == "quit":
                break
            try:
                blocks = order[: -(-args["tokens"] // LAYOUT.block_size)].tolist()
                if command == "expect":
                    ticket = args["ticket"]
                    imp = transport.expect(ticket, blocks, args["tokens"], timeout_s=120)
                    imports[ticket] = imp
                    # stamped the moment the ticket lands, as the decode engine's next step would see it
                    imp.future.add_done_callback(lambda _, t=ticket: landed.__setitem__(t, time.monotonic_ns()))
                    conn.send(("ok", imp.ticket))
                elif command == "wait":
                    imports.pop(args["ticket"]).wait(REPLY_S)
                    while args["ticket"] not in landed:  # a future wakes its waiters before its callbacks run
                        time.sleep(0)
                    conn.send(("ok", landed.pop(args["ticket"])))
                elif command == "fill":
                    ids = torch.tensor(blocks, device=device)
                    for kv in caches:
                        kv.index_copy_(1, ids, torch.randn((2, len(blocks), *shape[2:]), device=device).bfloat16())
                    conn.send(("ok", None))
                elif command == "push":
                    conn.send(("ok", _push(transport, caches, blocks, args["info"], device, args["lead_s"])))
                elif command == "sums":
                    conn.send(("ok", _sums(caches, blocks, device)))
                elif command == "timeline":
                    conn.send(("ok", transport.timeline.take(args["ticket"])))
            except BaseException:
                conn.send(("error", traceback.format_exc()))
    finally:
        transport.close()


def _push(
    transport: Any, caches: list[torch.Tensor], blocks: list[int], info: Any, device: str, lead_s: float
) -> tuple[int, int, bool]:
    """time.monotonic_ns() at the first push_layer (packing included) and when the sender heard the
    receiver's Done, and whether the blocks were written directly. The push opens lead_s before
    its first layer, as a prefill's opens when the request arrives."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    push = transport.push(info)
    if lead_s:
        time.sleep(lead_s)
    started = time.monotonic_ns()
    for layer, kv in enumerate(caches):
        push.push_layer(layer, kv, blocks, info.num_tokens)
    push.close()
    push.wait(REPLY_S)
    done = time.monotonic_ns()
    return started, done, push.direct is not None and push.direct.state.value == "armed"


def _sums(caches: list[torch.Tensor], blocks: list[int], device: str) -> list[int]:
    ids = torch.tensor(blocks, device=device)
    return [int(kv.index_select(1, ids).view(torch.int16).sum(dtype=torch.int64)) for kv in caches]


class Worker:
    def __init__(
        self,
        role: str,
        device: str,
        visible: str | None,
        args: argparse.Namespace,
        tls: str,
        message_mib: int,
        direct_writes: bool,
        side_channel: bool = True,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible  # read by the child at its CUDA init
        options = {
            "progress": args.progress, "delayed_submission": args.delayed_submission, "timeline": args.timeline,
            "direct_writes": direct_writes, "side_channel": side_channel,
        }  # fmt: skip
        worker_args = (theirs, role, device, args.pool_blocks, tls, message_mib << 20, options)
        self.process = ctx.Process(target=worker_main, args=worker_args, daemon=True)
        self.process.start()
        if visible is not None:
            if saved is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        self.address = self._reply(REPLY_S)

    def call(self, command: str, **args: Any) -> Any:
        self.conn.send((command, args))
        return self._reply(REPLY_S)

    def _reply(self, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"worker did not answer within {timeout_s} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker failed:\n{value}")
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(("quit", {}))
            self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
