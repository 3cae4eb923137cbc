"""An offer's copy into a KV store's mapped slots: the torch path against the one-launch writer,
interleaved in one run (kvtransfer/shm.py SlabSink, kvtransfer/slab_writer.py).

GPU (Llama-3.1-8B shapes: 32 layers, bf16, 2 MiB a block; a run is 8 blocks, 16 MiB):
    python bench/offer_copy.py --runs 200 --out offer_copy.json

The arena is a /dev/shm file registered with CUDA as a worker registers its store's (mapped, so
the device addresses it). Per run it reports the host time of what the engine's step thread does
(Engine.export_blocks' push_layer x 32 and close) and the device time of the copies (CUDA events
around them, the stream otherwise idle); every run is checked byte-exact. Slots come as one run of
consecutive slots (a fresh store's) or scattered (one torch copy per slot on the torch path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import LLAMA_8B  # noqa: E402
from engine.kv_cache import allocate_kv_cache  # noqa: E402
from engine.kv_layout import KVLayout  # noqa: E402
from kvtransfer import shm  # noqa: E402
from kvtransfer.slab_writer import SlabWriter, device_arena  # noqa: E402

LAYOUT = KVLayout("llama-8b-shaped", "bfloat16", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)


def one_run(
    caches: list[torch.Tensor], slabs: list[torch.Tensor], writer: SlabWriter | None, blocks: list[int],
    slots: list[int],
) -> tuple[float, float]:  # fmt: skip
    """(host ms, device ms) of one offer through a SlabSink, checked byte-exact."""
    torch.cuda.synchronize()
    start, sink = torch.cuda.Event(enable_timing=True), shm.SlabSink(slabs, slots, time.monotonic() + 60, writer)
    start.record()
    began = time.perf_counter()
    for layer, kv in enumerate(caches):
        sink.push_layer(layer, kv, blocks, len(blocks) * LAYOUT.block_size)
    sink.close()
    host_ms = (time.perf_counter() - began) * 1000
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    end.synchronize()
    assert sink.landed() and (writer is None or not writer.disabled)
    for kv, slab in zip(caches, slabs, strict=True):
        assert torch.equal(slab[:, slots].cuda(), kv[:, blocks]), "an offer's slots differ from its blocks"
    return host_ms, start.elapsed_time(end)


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    host, device = sorted(s[0] for s in samples), sorted(s[1] for s in samples)
    p90 = int(len(host) * 0.9)
    return {
        "host_ms_p50": statistics.median(host), "host_ms_p90": host[p90],
        "device_ms_p50": statistics.median(device), "device_ms_p90": device[p90],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=8, help="blocks per run (8: 16 MiB, the offerer's)")
    parser.add_argument("--cache-blocks", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    caches = allocate_kv_cache(LLAMA_8B, args.cache_blocks, LAYOUT.block_size, torch.bfloat16, device)
    for kv in caches:
        kv.normal_()
    path = Path(f"/dev/shm/pdmesh-offer-bench-{os.getpid()}")
    arena, _ = shm.create_arena(path, args.slots * shm.block_bytes(LAYOUT))
    try:
        started = time.perf_counter()
        assert shm.register(arena, device), "the arena could not be registered"
        register_s = time.perf_counter() - started
        view = device_arena(arena, device)
        assert view is not None, "the device cannot address the registered arena"
        slabs = shm.slab_tensors(arena, LAYOUT, args.slots)
        writer = SlabWriter(shm.slab_tensors(view, LAYOUT, args.slots))
        started = time.perf_counter()
        writer.prepare(caches)  # the worker's mapping thread does this: plan, compile, load
        result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "runs": args.runs,
                  "blocks_per_run": args.blocks, "register_s": register_s,
                  "prepare_s": time.perf_counter() - started}  # fmt: skip
        print(json.dumps(result), flush=True)
        gen = torch.Generator().manual_seed(0)
        for pattern in ("one_run_of_slots", "scattered_slots"):
            samples: dict[str, list[tuple[float, float]]] = {"torch": [], "one_launch": []}
            for i in range(args.runs + 5):  # the first 5 warm up (the allocators), not counted
                blocks = torch.randperm(args.cache_blocks, generator=gen)[: args.blocks].tolist()
                if pattern == "one_run_of_slots":
                    first = int(torch.randint(0, args.slots - args.blocks, (1,), generator=gen))
                    slots = list(range(first, first + args.blocks))
                else:
                    slots = torch.randperm(args.slots, generator=gen)[: args.blocks].tolist()
                order = ("torch", "one_launch") if i % 2 == 0 else ("one_launch", "torch")  # A B, B A
                for path_name in order:
                    sample = one_run(caches, slabs, writer if path_name == "one_launch" else None, blocks, slots)
                    if i >= 5:
                        samples[path_name].append(sample)
            result[pattern] = {name: summary(s) for name, s in samples.items()}
            print(pattern, json.dumps(result[pattern], indent=1), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    finally:
        shm.unregister(arena)
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
