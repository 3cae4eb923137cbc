"""What a perfect one-GPU server could reach on a closed-loop load of long prompts, from the
engine's own offline steps (bench/engine.py's JSON: decode ms/step at the batch, and mixed steps
of that batch plus one prompt chunk).

    python bench/serving_bound.py engine.json --batch 64 --input-len 1024 --output-len 256

Every request brings `input_len` prompt tokens per `output_len` output tokens. A perfect server
decodes the batch at the engine's pure-decode step time and fits every prompt into chunks that
ride on decode steps, each chunk of c tokens costing what it adds to a decode step there
(mixed(c) - decode). Per batch of requests served:

    time = output_len x decode + batch x input_len / c x (mixed(c) - decode)

so its output rate, against the engine's pure-decode rate, is at most

    bound(c) = output_len x decode / time

and the best chunk size gives the bound. Its TPOT is the mean step time, decode / bound. Nothing
else a server does (scheduling, transfers, the event loop) can do better than this on one GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Bound:
    chunk: int
    fraction: float  # of the engine's pure-decode output rate
    tokens_per_s: float
    tpot_ms: float  # the mean step time over the run: each request gets one token per step


def bounds(decode_ms: float, mixed_ms: dict[int, float], batch: int, input_len: int, output_len: int) -> list[Bound]:
    out = []
    for chunk, ms in sorted(mixed_ms.items()):
        extra_ms = max(0.0, ms - decode_ms) * batch * input_len / chunk
        total_ms = output_len * decode_ms + extra_ms
        fraction = output_len * decode_ms / total_ms
        out.append(Bound(chunk, fraction, batch * output_len / total_ms * 1000, total_ms / output_len))
    return out


def from_engine_json(path: Path, batch: int) -> tuple[float, dict[int, float]]:
    d = json.loads(path.read_text())
    decode = next(r["ms_per_step"] for r in d["decode"] if r["batch"] == batch)
    mixed = {r["chunk"]: r["ms_per_step"] for r in d.get("mixed", []) if r["batch"] == batch}
    return decode, mixed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine_json", type=Path)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    args = p.parse_args()
    decode, mixed = from_engine_json(args.engine_json, args.batch)
    print(f"engine: batch {args.batch} decodes at {decode:.2f} ms/step = {args.batch / decode * 1000:,.0f} tok/s")
    found = bounds(decode, mixed, args.batch, args.input_len, args.output_len)
    for b in found:
        tpot = f"TPOT {b.tpot_ms:.1f} ms = {b.tpot_ms / decode:.2f}x the step"
        rate = f"{b.tokens_per_s:,.0f} tok/s"
        print(f"  chunk {b.chunk:5d}: mixed {mixed[b.chunk]:.1f} ms -> bound {b.fraction:.1%} ({rate}, {tpot})")
    if found:
        best = max(found, key=lambda b: b.fraction)
        print(f"bound: {best.fraction:.1%} of the engine's decode rate ({best.tokens_per_s:,.0f} tok/s, "
              f"TPOT {best.tpot_ms:.1f} ms = {best.tpot_ms / decode:.2f}x), chunks of {best.chunk}")  # fmt: skip


if __name__ == "__main__":
    main()
