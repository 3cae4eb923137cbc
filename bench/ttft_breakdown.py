"""Where each request's time to first token goes, one request at a time: the phases the mesh
already reports in every response's Usage (pdmesh generate --explain's waterfall) for N
sequential random-token prompts, beside the TTFT the client measured.

    python bench/ttft_breakdown.py --target 127.0.0.1:50051 --input-len 4096 --requests 8 --out seq4k.json

Phases: schedule (arrival until the prompt went to the worker computing it: placement, the
decode worker's Reserve), queue (the computing worker's queue), prefill (its compute, the KV
store's lookup and the prefill-side push included), kv wait (the push not hidden behind compute),
rpc/other (the rest of the scheduler's TTFT: gRPC hops, the first token's way back), and client
(the client's TTFT less the scheduler's: the client's own hop). The medians over the requests
after the warm-up ones are printed and written; so is every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdmesh.client import AsyncClient, Chunk  # noqa: E402
from pdmesh.explain import phases  # noqa: E402


async def one(client: AsyncClient, prompt: list[int], output_len: int) -> dict:
    start = time.perf_counter()
    first: float | None = None
    last: Chunk | None = None
    async for chunk in client.generate(prompt, max_tokens=output_len, ignore_eos=True, temperature=0.0):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        last = chunk
    assert last is not None and last.usage is not None and first is not None
    row = {name: round(ms, 2) for name, ms in phases(last.usage)}
    row["ttft"] = round(last.usage.ttft_ms, 2)
    row["client"] = round(max(0.0, (first - start) * 1000 - last.usage.ttft_ms), 2)
    row["client_ttft"] = round((first - start) * 1000, 2)
    row["cached"] = last.usage.cached_prompt_tokens
    placement = last.placement
    row["plan"] = placement.plan.value if placement is not None and placement.plan is not None else ""
    return row


async def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    rows = []
    async with AsyncClient(args.target) as client:
        for i in range(args.warmup + args.requests):
            prompt = [int(t) for t in rng.integers(args.low_id, args.vocab, args.input_len)]
            row = await one(client, prompt, args.output_len)
            row["warmup"] = i < args.warmup
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            await asyncio.sleep(args.gap_s)
    measured = [r for r in rows if not r["warmup"]]
    keys = [k for k, v in measured[0].items() if isinstance(v, float)]
    medians = {k: round(statistics.median(r[k] for r in measured), 2) for k in keys}
    plans = sorted({r["plan"] for r in measured})
    print(f"median of {len(measured)} ({', '.join(plans)}): " + " ".join(f"{k}={v}" for k, v in medians.items()))
    return {"target": args.target, "input_len": args.input_len, "medians_ms": medians, "plans": plans, "requests": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--input-len", type=int, default=4096)
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gap-s", type=float, default=0.0, help="pause between requests (0: back to back, as bench serve)")
    p.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn below this")
    p.add_argument("--low-id", type=int, default=100, help="and at or above this (clear of special tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result = asyncio.run(run(args))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
