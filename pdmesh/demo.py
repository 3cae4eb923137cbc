"""`pdmesh demo`: the engine in one process, streaming a chat answer to stdout.

The smallest end-to-end proof that a machine is set up: load the model, render the chat
template, stream tokens as they are sampled.
"""

from __future__ import annotations

import asyncio
import sys
import time

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams

DEMO_PROMPT = "What is the capital of France?"


async def stream_answer(engine: AsyncEngine, prompt: str, max_tokens: int) -> None:
    tok = engine.engine.tokenizer
    assert tok is not None, "the demo needs a model with a tokenizer"
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
    start = time.perf_counter()
    first: float | None = None
    count = 0
    async for out in engine.generate("demo", ids, SamplingParams(max_tokens=max_tokens)):
        first = first or time.perf_counter()
        count += len(out.new_token_ids)
        sys.stdout.write(out.text_delta)
        sys.stdout.flush()
    total = time.perf_counter() - start
    ttft = (first or start) - start
    print(f"\n[{count} tokens, first after {ttft * 1000:.0f} ms, {count / total:.1f} tokens/s]", file=sys.stderr)


def run_demo(model: str, device: str, prompt: str, max_tokens: int, threads: int | None) -> None:
    print(f"loading {model} on {device} ...", file=sys.stderr)
    engine = AsyncEngine(Engine.from_config(EngineConfig(model=model, device=device, torch_threads=threads)))
    try:
        print(f"> {prompt}", file=sys.stderr)
        asyncio.run(stream_answer(engine, prompt, max_tokens))
    finally:
        engine.shutdown()
