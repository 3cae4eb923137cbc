"""The CPU engine step before and after the one-pass rotary and the planned decode gather, step by
step interleaved in one process (2026-11-26, issue 15; BENCHMARKS.md "Engine — CPU").

    python bench/cpu_step_interleaved.py --batches 1,8,32

A shared machine's load drifts over seconds, so two processes timed one after the other differ
by more than the change; here the earlier code (kept below, verbatim) and the current one take
turns step by step on the same engine, requests and KV, and each step is timed on the stepping
thread's CPU clock with one torch thread. Prints per batch the 10th percentile and the median of
60 steps each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine.attention as attention  # noqa: E402
import engine.model as model  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from kernels.paged_attention import paged_attention_decode  # noqa: E402


def _earlier_rotary(self: model.Rotary, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    freqs = positions.float()[:, None] * self.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _earlier_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _earlier_project(self: model.Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    q = _earlier_apply(q.view(-1, self.num_heads, self.head_dim), cos, sin)
    k = _earlier_apply(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
    return q, k, v.view(-1, self.num_kv_heads, self.head_dim)


def _earlier_decode(
    q: torch.Tensor, kv: torch.Tensor, meta: attention.AttentionMetadata, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    got = paged_attention_decode(q, kv[0], kv[1], meta.decode_block_tables, meta.decode_context_lens, scale)
    return got if out is None else out.copy_(got)


CURRENT = (model.Rotary.forward, model.Attention.project, attention._decode)
EARLIER = (_earlier_rotary, _earlier_project, _earlier_decode)


def use(code: tuple) -> None:
    model.Rotary.forward, model.Attention.project, attention._decode = code  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each variant per batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = CacheConfig(capacity_bytes=512 << 20)
    config = EngineConfig(model="smollm2", dtype=args.dtype, torch_threads=1, cache=cache)
    engine = Engine.from_config(config)
    for b in [int(x) for x in args.batches.split(",")]:
        params = SamplingParams(max_tokens=2 * args.steps + 8, ignore_eos=True)
        for i in range(b):
            engine.add_request(f"r{b}-{i}", [(7 * i + j) % 1000 + 1 for j in range(256)], params)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
            engine.step()
        times: dict[str, list[float]] = {"earlier": [], "current": []}
        for i in range(2 * args.steps):
            name = "earlier" if i % 2 == 0 else "current"
            use(EARLIER if name == "earlier" else CURRENT)
            t = time.thread_time()
            engine.step()
            times[name].append(time.thread_time() - t)
        use(CURRENT)
        cols = []
        for name, ts in times.items():
            ts.sort()
            cols.append(f"{name} p10 {ts[len(ts) // 10] * 1000:.2f} ms, median {ts[len(ts) // 2] * 1000:.2f} ms")
        print(f"batch {b}: " + " | ".join(cols), flush=True)
        for rid in list(engine.requests):
            engine.abort(rid)


if __name__ == "__main__":
    main()
