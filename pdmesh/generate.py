"""`pdmesh generate`: stream one completion from a running mesh to stdout."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import grpc

from pdmesh.client import AsyncClient, Chunk, Completion, PromptInput
from pdmesh.explain import waterfall


async def run_generate(args: argparse.Namespace) -> int:
    prompt: PromptInput = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    options = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
        ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms,
    )  # fmt: skip
    chunks: list[Chunk] = []
    try:
        async with AsyncClient(args.target) as client:
            async for chunk in client.generate(prompt, **options):
                chunks.append(chunk)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
    except grpc.aio.AioRpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    done = Completion.collect(chunks)
    if args.json:
        print(json.dumps(dataclasses.asdict(done), default=lambda o: getattr(o, "name", str(o))))
    else:
        print()
        if done.usage is not None and args.explain:
            print("\n".join(waterfall(done.usage, done.placement)), file=sys.stderr)
        elif done.usage is not None:
            u = done.usage
            print(f"[{u.completion_tokens} tokens, TTFT {u.ttft_ms:.0f} ms, e2e {u.e2e_ms:.0f} ms]", file=sys.stderr)
    return 0
