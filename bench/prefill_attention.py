"""Prefill-chunk attention on one CUDA GPU: the Triton kernel (kernels/paged_prefill.py) against
the SDPA path it replaced (engine.attention._prefill_chunk: the prefix gathered out of the cache,
flash attention, the output copied into the step's), Llama-3.1-8B shapes, bf16, 16-token blocks.

Not a test. Per (cached prefix, new tokens): device µs of one call (triton.testing.do_bench,
median) and host µs of one call (a loop of launches, no sync), and the largest difference
between the two outputs.

    python bench/prefill_attention.py --cases 0:256,768:256,0:512,512:512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.attention import PrefillSpan, _prefill_chunk  # noqa: E402
from kernels.paged_prefill import paged_prefill  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def host_us(call, repeats: int = 100) -> float:  # type: ignore[no-untyped-def]
    call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        call()
    host = (time.perf_counter() - t) / repeats * 1e6
    torch.cuda.synchronize()
    return host


def case(prefix: int, new: int) -> str:
    import triton.testing

    ctx, dev = prefix + new, "cuda"
    nb = -(-ctx // BLOCK)
    kv = torch.randn(2, nb + 64, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(nb + 64, device=dev)[:nb]
    q = torch.randn(new, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    flat = kv[:, ids].flatten(1, 2)[:, prefix:ctx]
    k, v = flat[0], flat[1]
    span = PrefillSpan(0, new, ctx, ids)
    info = torch.tensor([[0, new, ctx, 0]], dtype=torch.int64, device=dev)
    out_sdpa, out_tri = torch.empty_like(q), torch.empty_like(q)
    scale = HEAD_DIM**-0.5

    def sdpa() -> None:
        out_sdpa[:] = _prefill_chunk(q, k, v, kv, span, scale)

    def tri() -> None:
        paged_prefill(q, kv[0], kv[1], info, ids, scale, new, out_tri)

    sdpa()
    tri()
    diff = float((out_sdpa.float() - out_tri.float()).abs().max())
    d_sdpa, d_tri = triton.testing.do_bench(sdpa) * 1e3, triton.testing.do_bench(tri) * 1e3
    return (
        f"{prefix:>6} {new:>5} {d_sdpa:>10.1f} {d_tri:>10.1f} {host_us(sdpa):>10.1f} {host_us(tri):>10.1f} {diff:>9.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="0:256,768:256,0:512,512:512,1000:24", help="prefix:new,...")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    cols = ("sdpa dev", "triton dev", "sdpa host", "tri host")
    print(f"{'prefix':>6} {'new':>5} " + " ".join(f"{c:>10}" for c in cols) + f" {'max diff':>9}")
    for spec in args.cases.split(","):
        prefix, new = (int(x) for x in spec.split(":"))
        print(case(prefix, new), flush=True)


if __name__ == "__main__":
    main()
