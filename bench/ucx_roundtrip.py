"""Round trip of one kvtransfer control frame (4 KiB, tag-matched) between two processes, per ucxx
progress mode: the latency every UCX completion adds to a KV ticket on its way to the transport's
event loop. Not a test.

A KV ticket's critical path holds several such one-way hops (the Data header's arrival, the
payload's completion, the Done's arrival), each through ucxx's progress thread and its notifier
thread; this measures one hop pair without any KV. The modes alternate, each in fresh processes.

    python bench/ucx_roundtrip.py                                   # tcp,self; both modes, 2 rounds
    python bench/ucx_roundtrip.py --tls cuda_ipc,cuda_copy,sm,tcp,self --rounds 3   # a GPU host
    python bench/ucx_roundtrip.py --tls cuda_ipc,cuda_copy,sm,tcp,self --cuda-mib 2  # + a 2 MiB GPU payload

With --cuda-mib the pinging side sends a device buffer of that size before each frame (the echo
receives it into device memory): a KV payload's rendezvous (cuda_ipc on one host) plus the hops,
without kvtransfer.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from typing import Any

FRAME = 4096
MODES = ("thread", "thread-polling")


def _peer(role: str, mode: str, tls: str, trips: int, cuda_bytes: int, port: Any, result: Any) -> None:
    import ucxx

    payload: Any = None
    if cuda_bytes:
        import torch

        torch.cuda.set_device(0)
        payload = torch.ones(cuda_bytes, dtype=torch.uint8, device="cuda:0")

    async def main() -> None:
        ucxx.init(options={"TLS": tls}, progress_mode=mode, enable_python_future=True)
        if role == "echo":
            done = asyncio.Event()

            async def accept(ep: Any) -> None:
                frame = bytearray(FRAME)
                for _ in range(trips):
                    if payload is not None:
                        await ep.recv(payload, tag=2)
                    await ep.recv(frame, tag=1)
                    await ep.send(frame, tag=1)
                done.set()

            listener = ucxx.create_listener(accept)
            port.value = listener.port
            await asyncio.wait_for(done.wait(), 120)
            return
        while port.value == 0:
            await asyncio.sleep(0.01)
        ep = await asyncio.wait_for(ucxx.create_endpoint("127.0.0.1", port.value), 30)
        frame, back, times = bytearray(FRAME), bytearray(FRAME), []
        for _ in range(trips):
            started = time.perf_counter()
            if payload is not None:
                await ep.send(payload, tag=2)
            await ep.send(frame, tag=1)
            await ep.recv(back, tag=1)
            times.append(time.perf_counter() - started)
        result.put(times[trips // 10 :])  # the first tenth warms up

    asyncio.run(main())


def run(mode: str, tls: str, trips: int, cuda_bytes: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    port, result = ctx.Value("i", 0), ctx.Queue()
    peers = [
        ctx.Process(target=_peer, args=(r, mode, tls, trips, cuda_bytes, port, result), daemon=True)
        for r in ("echo", "ping")
    ]
    for p in peers:
        p.start()
    times = result.get(timeout=180)
    for p in peers:
        p.join(3)  # a peer's ucxx teardown can linger; its result is in
        if p.is_alive():
            p.kill()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tls", default="tcp,self")
    parser.add_argument("--trips", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cuda-mib", type=float, default=0, help="send a GPU payload of this size before each frame")
    args = parser.parse_args()
    for round_ in range(args.rounds):
        for mode in MODES:
            times = sorted(run(mode, args.tls, args.trips, int(args.cuda_mib * 2**20)))
            p50, p90 = statistics.median(times), times[int(len(times) * 0.9)]
            what = f"round {round_ + 1} {mode:>14} {args.tls} {args.cuda_mib:g} MiB"
            print(f"{what}: round trip p50 {p50 * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
