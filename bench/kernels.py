"""Micro-benchmarks of kernels/ on one CUDA GPU: paged decode attention and KV block packing.

Not a test. Llama-3.1-8B shapes (32 query heads, 8 KV heads, head_dim 128, bf16, 16-token blocks).

  attention: the Triton kernel (default launch and a few variants) and the torch reference against
             the floor: the K/V bytes the step must read over the device-copy bandwidth measured
             in the same run (copy bytes counted read plus write).
  pack:      pack_blocks / unpack_blocks of 1k- and 4k-token requests whose blocks are scattered
             through a large pool, in GB/s of payload, against a plain device copy of the same
             number of bytes and the index_select reference.

Three times per kernel, each a median of triton.testing.do_bench (L2 flushed before each timed call):
  gpu_us    device time of one call: a CUDA graph of R calls on R disjoint input sets (R chosen so the
            sets together far exceed L2), timed and divided by R. What a graph-captured decode step sees.
  eager_us  one plain call; includes the host overhead wherever that exceeds the device time.
  host_us   host time of one call (a loop of launches without synchronising).
Each case also checks the kernel against the reference and records the largest difference. Prints a
table; writes JSON to --out.

    python bench/kernels.py --out bench/results/kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kernels.kv_pack import pack_blocks, pack_blocks_ref, unpack_blocks  # noqa: E402
from kernels.paged_attention import (  # noqa: E402
    DecodeLaunchConfig,
    paged_attention_decode,
    paged_attention_decode_ref,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 32, 8, 128, 16, 32
DTYPE = torch.bfloat16
ROTATION_BYTES = 256 << 20  # input bytes a graph cycles through: several times the 50-60 MB L2
MAX_ROTATION = 64
PACK_TOKENS = (1024, 4096)  # request sizes packed
VARIANTS = {
    "default": DecodeLaunchConfig(),
    "block_n=32": DecodeLaunchConfig(block_n=32),
    "block_n=128,warps=8": DecodeLaunchConfig(block_n=128, num_warps=8),
    "stages=3": DecodeLaunchConfig(num_stages=3),
    "1 program/SM": DecodeLaunchConfig(programs_per_sm=1),
    "4 programs/SM": DecodeLaunchConfig(programs_per_sm=4),
    "dot_fp32": DecodeLaunchConfig(dot_fp32=True),
}
Call = Callable[[], object]


def median_ms(fn: Call) -> float:
    import triton.testing

    result = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)  # one quantile: a float


def graph_us(calls: Sequence[Call]) -> float:
    """Device microseconds per call: the calls captured back to back in one CUDA graph.

    If capture fails, the eager median of the first call instead (a NaN-free table beats none).
    """
    try:
        return _graph_us(calls)
    except Exception as exc:
        print(f"    (CUDA graph capture failed, timing eagerly: {exc!r:.200})")
        torch.cuda.synchronize()
        return median_ms(calls[0]) * 1e3


def _graph_us(calls: Sequence[Call]) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture: compile, settle the allocator
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_ms(graph.replay) * 1e3 / len(calls)


def host_us(call: Call, repeats: int = 200) -> float:
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / repeats * 1e6


def rotation(nbytes: int) -> int:
    return max(1, min(MAX_ROTATION, math.ceil(ROTATION_BYTES / nbytes)))


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second."""
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def attention_case(batch: int, context: int, device: torch.device, copy_gbps: float) -> dict[str, Any]:
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    sets = rotation(kv_bytes)
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = sets * batch * blocks_per_seq  # each input set owns its own blocks
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, dtype=DTYPE, device=device)
    v_cache = torch.randn(cache_shape, dtype=DTYPE, device=device)
    tables = torch.randperm(num_blocks, device=device).view(sets, batch, blocks_per_seq).int()
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    qs = torch.randn(sets, batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    inputs = [(qs[i], k_cache, v_cache, tables[i], context_lens, HEAD_DIM**-0.5) for i in range(sets)]
    row: dict[str, Any] = {"batch": batch, "context": context, "kv_bytes": kv_bytes, "input_sets": sets}
    row["floor_us"] = kv_bytes / (copy_gbps * 1e9) * 1e6
    want = paged_attention_decode_ref(*inputs[0]).float()
    row["ref_eager_us"] = median_ms(lambda: paged_attention_decode_ref(*inputs[0])) * 1e3
    row["variants"] = {}
    for name, config in VARIANTS.items():
        try:
            row["variants"][name] = time_variant(inputs, config, want, eager=name == "default")
        except Exception as exc:  # keep the other variants' figures
            row["variants"][name] = {"error": repr(exc)}
    return row


def time_variant(
    inputs: list[tuple[Any, ...]], config: DecodeLaunchConfig, want: torch.Tensor, eager: bool
) -> dict[str, float]:
    calls = [partial(paged_attention_decode, *args, use_triton=True, config=config) for args in inputs]
    err = float((paged_attention_decode(*inputs[0], use_triton=True, config=config).float() - want).abs().max())
    result = {"gpu_us": graph_us(calls), "max_abs_err": err}
    if eager:
        result["eager_us"] = median_ms(calls[0]) * 1e3
        result["host_us"] = host_us(calls[0])
    return result


def pack_case(tokens: int, num_layers: int, layers: list[torch.Tensor]) -> dict[str, Any]:
    device, pool_blocks = layers[0].device, layers[0].shape[1]
    n = tokens // BLOCK_SIZE
    group = layers[:num_layers]
    shape = (num_layers, 2, n, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    payload = math.prod(shape) * DTYPE.itemsize
    sets = rotation(payload)
    ids = [torch.randperm(pool_blocks, device=device)[:n] for _ in range(sets)]
    stagings = [torch.empty(shape, dtype=DTYPE, device=device) for _ in range(sets)]
    sources = [torch.randn(shape, dtype=DTYPE, device=device) for _ in range(sets)]
    want = torch.empty(shape, dtype=DTYPE, device=device)
    pack_blocks(group, ids[0], stagings[0])
    pack_blocks_ref(group, ids[0], want)
    row: dict[str, Any] = {"tokens": tokens, "layers": num_layers, "bytes": payload, "input_sets": sets}
    row["exact"] = bool(torch.equal(stagings[0].view(torch.int16), want.view(torch.int16)))
    pairs = list(zip(ids, stagings, sources, strict=True))
    calls: dict[str, list[Call]] = {
        "pack": [partial(pack_blocks, group, i, s) for i, s, _ in pairs],
        "unpack": [partial(unpack_blocks, s, group, i) for i, s, _ in pairs],
        "index_select": [partial(pack_blocks_ref, group, i, s) for i, s, _ in pairs],
        "copy": [partial(s.copy_, src) for _, s, src in pairs],
    }
    for name, fns in calls.items():
        try:
            us = graph_us(fns)
        except Exception as exc:  # keep the other timings
            row[f"{name}_error"], us = repr(exc), math.nan
        row[f"{name}_gpu_us"] = us
        row[f"{name}_gbps"] = payload / (us * 1e-6) / 1e9
    row["pack_host_us"] = host_us(calls["pack"][0])
    return row


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    import triton

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                   "block_size": BLOCK_SIZE, "dtype": str(DTYPE)},
    }  # fmt: skip
    copy_gbps = copy_bandwidth_gbps(device)
    result["copy_gbps_read_plus_write"] = copy_gbps
    print(f"{result['device']}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device copy: {copy_gbps:.0f} GB/s (read + write)\n")

    result["attention"] = []
    for batch in args.batches:
        for context in args.contexts:
            try:
                row = attention_case(batch, context, device, copy_gbps)
            except Exception:
                row = {"batch": batch, "context": context, "error": traceback.format_exc(limit=3)}
            result["attention"].append(row)
            torch.cuda.empty_cache()
            print_attention_row(row)

    result["pack"] = []
    if not args.skip_pack:
        shape = (2, args.pool_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        layers = [torch.randn(shape, dtype=DTYPE, device=device) for _ in range(NUM_LAYERS)]
        print(f"\npack/unpack over a pool of {args.pool_blocks} blocks x {NUM_LAYERS} layers; GB/s of payload")
        for tokens in PACK_TOKENS:
            for num_layers in (1, 8, NUM_LAYERS):
                try:
                    row = pack_case(tokens, num_layers, layers)
                except Exception:
                    row = {"tokens": tokens, "layers": num_layers, "error": traceback.format_exc(limit=3)}
                result["pack"].append(row)
                print_pack_row(row)
    return result


def print_attention_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"attention batch={row['batch']} context={row['context']}: ERROR\n{row['error']}")
        return
    default = row["variants"]["default"]
    head = f"attention b={row['batch']:<3d} ctx={row['context']:<5d} floor {row['floor_us']:7.1f} us"
    if "eager_us" in default:
        head += f"  eager {default['eager_us']:7.1f} us (host {default['host_us']:5.1f})"
    print(f"{head}  torch ref eager {row['ref_eager_us']:8.1f} us")
    for name, v in row["variants"].items():
        if "error" in v:
            print(f"    {name:<22s} ERROR {v['error'][:200]}")
            continue
        gbps = row["kv_bytes"] / (v["gpu_us"] * 1e-6) / 1e9
        ratio = row["floor_us"] / v["gpu_us"]
        print(
            f"    {name:<22s} gpu {v['gpu_us']:7.1f} us  {gbps:6.0f} GB/s  floor/gpu {ratio:5.2f}"
            f"  max|err| {v['max_abs_err']:.2e}"
        )


def print_pack_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"pack tokens={row['tokens']} layers={row['layers']}: ERROR\n{row['error']}")
        return
    size = f"{row['tokens']:5d} tok x {row['layers']:2d} layers ({row['bytes'] / 2**20:6.1f} MiB)"
    print(
        f"{size} exact={row['exact']}: pack {row['pack_gbps']:6.0f}  unpack {row['unpack_gbps']:6.0f}"
        f"  index_select {row['index_select_gbps']:6.0f}  copy {row['copy_gbps']:6.0f}"
        f"  (pack gpu {row['pack_gpu_us']:6.1f} us, host {row['pack_host_us']:5.1f} us)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--pool-blocks", type=int, default=4096, help="blocks per layer in the pack pool")
    parser.add_argument("--skip-pack", action="store_true")
    args = parser.parse_args()
    if args.pool_blocks < max(PACK_TOKENS) // BLOCK_SIZE:
        parser.error(f"--pool-blocks must hold the largest request: at least {max(PACK_TOKENS) // BLOCK_SIZE}")
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU")
    result = run(args, torch.device("cuda"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
