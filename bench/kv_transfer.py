"""KV transfer between two worker processes, end to end, against a plain copy of the same bytes.

Not a test. A request-shaped payload in Llama-3.1-8B dims (32 layers, 8 KV heads, head_dim 128,
bf16, 16-token blocks scattered over a pool of --pool-blocks) of 256, 1k, 4k and 16k tokens is
pushed layer by layer from a sending worker to a receiving worker through kvtransfer. Two timings,
both from the first push_layer (so packing is included), on one clock (time.monotonic_ns, the same
in every process of a host): until the receiver's ticket resolved (`landed`: every layer in its
blocks, what the decode engine's first step waits for), and until the sender heard the receiver's
Done (`done`: what the prefill worker's Prefill reply waits for). GB/s = payload bytes / that time;
each gets its own fixed cost per ticket (least-squares intercept over the sizes).
Each push opens --open-lead-ms before its first layer, as a prefill worker's opens when the request
arrives (its prefill then takes at least that long before the first layer is final).

Two paths on GPUs (--paths), each a pair of processes of its own, in the same run:
  direct  the sender writes the blocks straight into the receiver's cache over CUDA IPC (the
          push's AskWrite is granted during the lead; then one copy kernel per message and one Written,
          sent once the copies have finished; AskWrite, Granted with the ids, Written and Done over the
          same-host side channel)
  direct-frames  the same with the side channel off: those as UCX control frames, the ids a payload
  ucx     direct writes off: packed into staging buffers, sent over UCX, unpacked (the old path)

  GPU (default): pairs of processes, each seeing one GPU (CUDA_VISIBLE_DEVICES), sender GPU first:
      1:0  GPU1 -> GPU0 (cuda_ipc over NVLink); the ceiling is a torch peer copy cuda:1 -> cuda:0
      0:0  GPU0 -> GPU0 between two processes; the ceiling is a device-to-device copy on cuda:0
  --host: host memory over tcp (UCX_TLS tcp,self) on a CPU machine; the ceiling is a torch copy
      of the same bytes in host memory (memcpy), measured in the same run.

Every size is checked once: per-layer integer sums of the sender's and receiver's blocks must agree.
Prints a table; writes JSON to --out. The worker processes are bench/kv_transfer_worker.py.

    python bench/kv_transfer.py --out bench/results/kv_transfer_gpu.json             # nvidia-h200-x2
    python bench/kv_transfer.py --host --out bench/results/kv_transfer_host.json     # CPU machine
    python bench/kv_transfer.py --quick                                              # smoke: 256/1k, 2 runs
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.kv_transfer_worker import LAYOUT, Worker  # noqa: E402

TOKENS = (16, 256, 1024, 4096, 16384)  # 16 tokens (one block a layer): mostly the fixed cost per ticket
GPU_TLS = "cuda_ipc,cuda_copy,sm,tcp,self"  # sm carries UCX's rendezvous control faster than tcp
HOST_TLS = "tcp,self"
# kvtransfer.config.ProgressMode's values (importing it would load ucxx in this process); auto: its default
PROGRESS_MODES = ("auto", "thread", "thread-polling")


def payload_bytes(tokens: int) -> int:
    blocks = -(-tokens // LAYOUT.block_size)
    return blocks * LAYOUT.block_elems_per_layer * 2 * LAYOUT.num_layers  # bf16: 2 bytes


# ---- ceilings, measured in the parent


def ceiling_gbps(nbytes: int, src: str, dst: str, iters: int) -> float:
    """A plain torch copy of nbytes from src to dst (peer, device or host memcpy): payload GB/s."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=src).random_()
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    times = []
    for _ in range(iters + 2):
        if a.is_cuda:
            torch.cuda.synchronize(a.device)
            torch.cuda.synchronize(b.device)
        started = time.perf_counter()
        b.copy_(a)
        if a.is_cuda:
            torch.cuda.synchronize(a.device)
            torch.cuda.synchronize(b.device)
        times.append(time.perf_counter() - started)
    return nbytes / statistics.median(times[2:]) / 1e9


# ---- one pair of processes over every size


def run_pair(
    name: str, sender: Worker, receiver: Worker, args: argparse.Namespace, ceiling_devices: tuple[str, str]
) -> list[dict]:
    rows = []
    for tokens in args.tokens:
        nbytes = payload_bytes(tokens)
        ceiling = ceiling_gbps(nbytes, *ceiling_devices, iters=args.iters)
        sender.call("fill", tokens=tokens)
        times, landings, timelines, direct = [], [], [], 0
        for i in range(args.warmup + args.iters):
            ticket = f"{name}-{tokens}-{i}"
            info = receiver.call("expect", ticket=ticket, tokens=tokens)
            started, done, wrote_directly = sender.call(
                "push", tokens=tokens, info=info, lead_s=args.open_lead_ms / 1e3
            )
            landed = receiver.call("wait", ticket=ticket, tokens=tokens)
            if i == 0:
                exact = sender.call("sums", tokens=tokens) == receiver.call("sums", tokens=tokens)
            if args.timeline:
                steps = [("S", *s) for s in sender.call("timeline", ticket=ticket, tokens=tokens)]
                steps += [("R", *s) for s in receiver.call("timeline", ticket=ticket, tokens=tokens)]
            if i >= args.warmup:
                times.append((done - started) / 1e9)
                landings.append((landed - started) / 1e9)
                direct += wrote_directly
                if args.timeline:
                    timelines.append(steps)
        gbps = [nbytes / t / 1e9 for t in times]
        landed_gbps = [nbytes / t / 1e9 for t in landings]
        row = {
            "pair": name, "tokens": tokens, "mib": nbytes / 2**20, "exact": exact,
            "median_ms": statistics.median(times) * 1e3, "median_gbps": statistics.median(gbps),
            "best_gbps": max(gbps), "ceiling_gbps": ceiling, "of_ceiling": statistics.median(gbps) / ceiling,
            "landed_ms": statistics.median(landings) * 1e3, "landed_gbps": statistics.median(landed_gbps),
            "landed_of_ceiling": statistics.median(landed_gbps) / ceiling, "direct_share": direct / len(times),
        }  # fmt: skip
        print(
            f"{name:>20} {tokens:>6} {row['mib']:>8.0f} {row['landed_ms']:>9.2f} {row['median_ms']:>9.2f}"
            f" {row['landed_gbps']:>8.1f} {row['median_gbps']:>8.1f} {ceiling:>9.1f} {row['landed_of_ceiling']:>7.0%}"
            f" {row['of_ceiling']:>7.0%} {'yes' if exact else 'NO':>5} {row['direct_share']:>6.0%}",
            flush=True,
        )
        if timelines:
            row["timeline"] = timeline_table(timelines)
            print_timeline(row["timeline"])
        rows.append(row)
    return rows


def timeline_table(timelines: list[list[tuple[str, str, int, int]]]) -> list[dict]:
    """Per step (side, step, message), the median over tickets of ms since the sender's first push_layer."""
    offsets: dict[tuple[str, str, int], list[float]] = {}
    for steps in timelines:
        zero = min(stamp for side, step, _, stamp in steps if side == "S" and step == "first_layer")
        for side, step, part, stamp in steps:
            offsets.setdefault((side, step, part), []).append((stamp - zero) / 1e6)
    table = [
        {"side": side, "step": step, "part": part, "ms": statistics.median(ms), "n": len(ms)}
        for (side, step, part), ms in offsets.items()
    ]
    return sorted(table, key=lambda r: r["ms"])


def print_timeline(table: list[dict]) -> None:
    previous = None
    for r in table:
        gap = "" if previous is None else f"(+{r['ms'] - previous:.3f})"
        part = "" if r["part"] < 0 else f"[{r['part']}]"
        print(f"{'':>16}{r['side']} {r['step'] + part:<22} {r['ms']:>8.3f} ms {gap}", flush=True)
        previous = r["ms"]


def fixed_costs(rows: list[dict], key: str = "median_ms") -> dict[str, dict[str, float]]:
    """Per pair: median ms (`key`: to the sender's Done, or landed_ms) = fixed + bytes / marginal
    rate, fitted by least squares over the sizes."""
    fits = {}
    for label in dict.fromkeys(r["pair"] for r in rows):
        xs = [r["mib"] * 2**20 for r in rows if r["pair"] == label]
        ys = [r[key] for r in rows if r["pair"] == label]
        if len(xs) < 2:
            continue
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        fits[label] = {"fixed_ms": my - slope * mx, "marginal_gbps": 1e-6 / slope if slope > 0 else math.inf}
    return fits


def device_name(host: bool) -> str:
    if host or not torch.cuda.is_available():
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return torch.cuda.get_device_name(0)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", action="store_true", help="host memory over tcp instead of GPUs")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 and 1k tokens, 1 warm-up, 2 runs")
    parser.add_argument("--tokens", type=_ints, default=list(TOKENS))
    parser.add_argument("--pairs", default="1:0,0:0", help="GPU mode: sender:receiver GPU pairs")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pool-blocks", type=int, default=None, help="blocks per pool (default: 2x the largest)")
    parser.add_argument(
        "--message-mib", type=_ints, default=[32, 512], help="message sizes to compare (layers grouped up to it)"
    )
    parser.add_argument(
        "--progress",
        default="auto",
        choices=PROGRESS_MODES,
        help="ucxx progress mode (TransportConfig)",
    )
    parser.add_argument(
        "--delayed-submission",
        choices=["auto", "on", "off"],
        default="auto",
        help="ucxx posts sends and receives from its progress thread (on) or the loop (off); auto: off on GPUs",
    )
    parser.add_argument(
        "--open-lead-ms", type=float, default=2.0, help="open each push this long before its first layer"
    )
    parser.add_argument(
        "--paths",
        default="direct,ucx",
        help="GPU mode: direct (CUDA IPC writes), direct-frames (no side channel), ucx (direct writes off)",
    )
    parser.add_argument("--timeline", action="store_true", help="print each ticket step's median time (both sides)")
    parser.add_argument("--ucx-tls", default=None, help=f"default {GPU_TLS} (GPU) or {HOST_TLS} (--host)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.delayed_submission = {"auto": None, "on": True, "off": False}[args.delayed_submission]
    if args.quick:
        args.tokens, args.iters, args.warmup = [t for t in args.tokens if t <= 1024] or [256], 2, 1
    args.pool_blocks = args.pool_blocks or 2 * -(-max(args.tokens) // LAYOUT.block_size)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    tls = args.ucx_tls or (HOST_TLS if args.host else GPU_TLS)

    print(
        f"{'pair':>20} {'tokens':>6} {'MiB':>8} {'landed':>9} {'done':>9} {'GB/s ld':>8} {'GB/s dn':>8}"
        f" {'ceiling':>9} {'ld/ceil':>7} {'dn/ceil':>7} exact direct"
    )
    rows: list[dict] = []
    failures: list[str] = []
    if args.host:
        plan = [("host", "cpu", None, "cpu", None, ("cpu", "cpu"))]
    else:
        count = torch.cuda.device_count()
        plan = []
        for pair in args.pairs.split(","):
            src, dst = (int(x) for x in pair.split(":"))
            if max(src, dst) >= count:
                failures.append(f"pair {pair}: only {count} GPU(s) visible")
                continue
            plan.append((f"gpu{src}->{dst}", "cuda:0", str(dst), "cuda:0", str(src), (f"cuda:{src}", f"cuda:{dst}")))
    paths = ["ucx"] if args.host else args.paths.split(",")
    for message_mib in args.message_mib:
        for (name, recv_device, recv_visible, send_device, send_visible, ceiling_devices), path in itertools.product(
            plan, paths
        ):
            label = f"{name}/{path}/{message_mib}M"
            direct_writes, side_channel = path.startswith("direct"), path != "direct-frames"
            workers: list[Worker] = []
            try:
                for role, device, visible in (("recv", recv_device, recv_visible), ("send", send_device, send_visible)):
                    workers.append(
                        Worker(role, device, visible, args, tls, message_mib, direct_writes, side_channel)
                    )
                rows += run_pair(label, workers[1], workers[0], args, ceiling_devices)
            except Exception:
                failures.append(f"{label}:\n{traceback.format_exc()}")
                print(f"{label} FAILED:\n{failures[-1]}", flush=True)
            finally:
                for worker in workers:
                    worker.stop()

    fits = fixed_costs(rows)
    landed_fits = fixed_costs(rows, "landed_ms")
    for label, fit in fits.items():
        landed = landed_fits[label]
        print(
            f"{label}: fixed cost per ticket (least-squares intercept of ms against MiB) to landed "
            f"{landed['fixed_ms']:.2f} ms ({landed['marginal_gbps']:.1f} GB/s marginal), to Done "
            f"{fit['fixed_ms']:.2f} ms ({fit['marginal_gbps']:.1f} GB/s marginal)",
            flush=True,
        )
    report = {
        "bench": "kv_transfer", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "device": device_name(args.host),
        "cpus": os.cpu_count(), "torch": torch.__version__, "ucx_tls": tls, "progress": args.progress,
        "delayed_submission": args.delayed_submission, "open_lead_ms": args.open_lead_ms, "paths": paths,
        "pool_blocks": args.pool_blocks, "iters": args.iters, "command": " ".join(sys.argv), "rows": rows,
        "fixed_costs": fits, "landed_fixed_costs": landed_fits, "failures": failures,
    }  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
