"""What one big prompt does to the other streams of a running mesh.

    pdmesh up &                                   # or any mesh; its scheduler's address:
    python bench/big_prompt.py --target 127.0.0.1:50051 --sizes-mib 0.5,0.99,20

For each size, a stream of --stream-tokens tokens runs; once it has produced 20 chunks, one text
prompt of that many MiB is sent (max_tokens 1). The table gives the big request's status and
time to it, and the longest gap between two chunks of the running stream while the big request
was in flight next to the stream's median gap: a tokenizer on the scheduler's event loop shows
as a gap of the tokenizing time, a refusal before tokenizing as none.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # the repository, before bench/ (which has an engine.py)

from pdmesh.client import AsyncClient  # noqa: E402

_SEND = """
import sys, time, grpc
from pdmesh.client import Client
text = "pdmesh " * int(float(sys.argv[2]) * (1 << 20) / 7)
with Client(sys.argv[1]) as client:
    started = time.monotonic()
    try:
        client.complete(text, max_tokens=1, timeout_s=300)
        status = "OK"
    except grpc.RpcError as e:
        status = f"{e.code().name}: {(e.details() or '')[:70]}"
    print(f"{time.monotonic() - started}\t{status}")
"""


async def one_size(client: AsyncClient, target: str, mib: float, stream_tokens: int) -> dict[str, object]:
    arrivals: list[float] = []
    ready = asyncio.Event()

    async def stream() -> None:
        prompt = [{"role": "user", "content": "Count from one to one thousand in words."}]
        async for _chunk in client.generate(prompt, max_tokens=stream_tokens, ignore_eos=True):
            arrivals.append(time.monotonic())
            if len(arrivals) == 20:
                ready.set()

    running = asyncio.ensure_future(stream())
    await ready.wait()
    sent = time.monotonic()
    # From another process: building and sending megabytes here would stall this client's own loop.
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SEND, target, str(mib), cwd=str(_ROOT), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await sender.communicate()
    seconds, status = out.decode().strip().split("\t", 1)
    answered = time.monotonic()
    await running
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    during = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False) if b >= sent and a <= answered]
    return {
        "MiB": mib, "status": status, "answered_s": float(seconds),
        "max_gap_during_ms": 1000 * max(during, default=0.0), "median_gap_ms": 1000 * statistics.median(gaps),
    }  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--sizes-mib", default="0.5,0.99,20")
    parser.add_argument("--stream-tokens", type=int, default=300)
    args = parser.parse_args()
    async with AsyncClient(args.target) as client:
        rows = [await one_size(client, args.target, float(s), args.stream_tokens) for s in args.sizes_mib.split(",")]
    print("| prompt | status | answered after | longest stream gap meanwhile | stream's median gap |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['MiB']} MiB | {r['status']} | {r['answered_s']:.2f} s | {r['max_gap_during_ms']:.0f} ms "
              f"| {r['median_gap_ms']:.0f} ms |")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
