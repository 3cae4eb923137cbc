"""The direct writer's block-to-block copy over NVLink against the copy engine (issue 13's ceiling).

Two GPUs: GPU 1's caches copied into GPU 0's, Llama-3.1-8B KV blocks (32 layers, 16 tokens x 8
heads x 128 bf16 = 32 KiB each of K and V) scattered over a 2,200-block pool on each side, by
`kernels/_kv_pack_kernel._copy_between_kernel` as a direct writer launches it (on the sender's
device, writing peer memory), over every CHUNK (bytes a program copies) and num_warps; beside a
torch peer copy of the same bytes, contiguous (the copy engine: the transfer targets' ceiling).
CUDA-event times on the sender's stream, median of 15; every variant checked byte-exact. Then the
host cost of a ticket's block-id upload: push.py's old way (a fresh pinned tensor) against numpy
filling a reused pinned buffer.

    python3 bench/copy_kernel_sweep.py sweep.json       # on a machine with two GPUs, NVLink
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.kv_pack as kv_pack  # noqa: E402
from kernels._kv_pack_kernel import WORD_TYPES, _copy_between_kernel  # noqa: E402

LAYERS, BLOCK_TOKENS, HEADS, HEAD_DIM, POOL = 32, 16, 8, 128, 2200
SRC, DST = torch.device("cuda:1"), torch.device("cuda:0")


def event_time(fn: Callable[[], object], stream: torch.cuda.Stream, iters: int = 15, warmup: int = 3) -> float:
    """Median seconds of fn on stream between two CUDA events (after `warmup` uncounted runs)."""
    times = []
    for _ in range(iters + warmup):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[warmup:])


def wall_time(fn: Callable[[], object], iters: int = 15) -> float:
    """Median wall seconds of fn, both devices synchronised before and after (as kv_transfer.py's ceiling)."""
    times = []
    for _ in range(iters + 3):
        torch.cuda.synchronize(SRC)
        torch.cuda.synchronize(DST)
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize(SRC)
        torch.cuda.synchronize(DST)
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


def main(out: Path) -> None:
    peer = torch.cuda.can_device_access_peer(1, 0)
    print(torch.cuda.get_device_name(0), torch.cuda.device_count(), "GPUs, peer 1->0:", peer)
    shape = (2, POOL, BLOCK_TOKENS, HEADS, HEAD_DIM)
    src = [torch.randn(shape, device=SRC).bfloat16() for _ in range(LAYERS)]
    dst = [torch.zeros(shape, device=DST, dtype=torch.bfloat16) for _ in range(LAYERS)]
    torch.zeros(4, device=DST).copy_(torch.zeros(4, device=SRC))  # enables peer access 1 -> 0
    # A direct writer's destination is the receiver's cache mapped over CUDA IPC on the sender's own
    # device; here it is GPU 0's memory itself, which the plan's same-device checks would refuse.
    kv_pack._check_pair = lambda *args, **kwargs: None
    kv_pack.check_triton_device = lambda *args, **kwargs: None
    plan = kv_pack.plan_copy(src, dst)
    plan.dst_offsets = plan.dst_offsets.to(SRC)  # the kernel reads its layer table on the sender's device
    print("plan: word", plan.word_bytes, "bytes, block_words", plan.block_words, "chunk", plan.chunk)
    stream = torch.cuda.Stream(SRC)
    rows = []
    for tokens in (1024, 4096, 16384):
        n = tokens // BLOCK_TOKENS
        generator = torch.Generator().manual_seed(tokens)
        src_ids = torch.randperm(POOL, generator=generator)[:n].to(SRC)
        dst_ids = torch.randperm(POOL, generator=generator)[:n].to(SRC)
        nbytes = n * LAYERS * 2 * BLOCK_TOKENS * HEADS * HEAD_DIM * 2
        a = torch.empty(nbytes, dtype=torch.uint8, device=SRC)
        b = torch.empty(nbytes, dtype=torch.uint8, device=DST)
        with torch.cuda.stream(stream):
            engine = event_time(lambda a=a, b=b: b.copy_(a), stream)
        engine_wall = wall_time(lambda a=a, b=b: b.copy_(a))
        print(
            f"tokens {tokens} MiB {nbytes / 2**20:.0f}: peer copy (copy engine) {nbytes / engine / 1e9:.1f} GB/s "
            f"by events, {nbytes / engine_wall / 1e9:.1f} wall"
        )
        for chunk_words in (512, 1024, 2048, 4096):
            for warps in (2, 4, 8, 16):
                if chunk_words * plan.word_bytes // (warps * 32) < 16:  # under 16 bytes a thread
                    continue
                per_block = -(-plan.block_words // chunk_words)
                grid = (n * per_block, 2 * LAYERS, 1)
                args = (
                    plan.src_base, plan.src_offsets, src_ids, plan.dst_base, plan.dst_offsets, dst_ids, POOL, POOL,
                    WORD_TYPES[plan.word_bytes], plan.src_align, plan.dst_align, plan.block_words, chunk_words,
                    per_block,
                )  # fmt: skip

                def launch(grid: tuple[int, int, int] = grid, args: tuple = args, warps: int = warps) -> None:
                    _copy_between_kernel[grid](*args, num_warps=warps)

                with torch.cuda.stream(stream):
                    launch()
                    stream.synchronize()
                    seconds = event_time(launch, stream)
                exact = all(
                    torch.equal(dst[layer][:, dst_ids.to(DST)], src[layer][:, src_ids].to(DST))
                    for layer in (0, LAYERS - 1)
                )
                rows.append({
                    "tokens": tokens, "chunk_bytes": chunk_words * plan.word_bytes, "warps": warps,
                    "gbps": nbytes / seconds / 1e9, "of_ce": engine / seconds, "ok": exact,
                })  # fmt: skip
                print(
                    f"  chunk {chunk_words * plan.word_bytes:>6} B warps {warps:>2}: {nbytes / seconds / 1e9:6.1f} GB/s"
                    f" = {engine / seconds:5.1%} of the copy engine, exact={exact}"
                )
    out.write_text(json.dumps(rows, indent=1))
    upload_costs()


def upload_costs() -> None:
    """Host µs to put n block ids on the device: a fresh pinned tensor, against numpy into a kept one."""
    kept = torch.empty(4096, dtype=torch.int64).pin_memory()
    kept_array = kept.numpy()
    for n in (64, 256, 1024):
        ids = list(range(0, 2 * n, 2))

        def fresh(ids: list[int] = ids) -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.int64, pin_memory=True).to(SRC, non_blocking=True)

        def numpy_fill(ids: list[int] = ids, n: int = n) -> torch.Tensor:
            kept_array[:n] = ids
            return kept[:n].to(SRC, non_blocking=True)

        for name, upload in (("fresh pinned (push.py before)", fresh), ("numpy into kept pinned", numpy_fill)):
            for _ in range(20):
                upload()
            torch.cuda.synchronize(SRC)
            times = []
            for _ in range(200):
                started = time.perf_counter_ns()
                upload()
                times.append(time.perf_counter_ns() - started)
            torch.cuda.synchronize(SRC)
            print(f"ids {n:>5} {name:>30}: p50 {statistics.median(times) / 1e3:.1f} us")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "copy_kernel_sweep.json"))
