"""Small helpers for driving an Engine to completion in tests."""

from __future__ import annotations

from pathlib import Path

from engine.config import BatcherConfig, CacheConfig, EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams


def make_engine(
    path: Path | str,
    *,
    num_blocks: int | None = 256,
    block_size: int = 4,
    max_batched_tokens: int = 512,
    max_prefill_chunk: int = 512,
    prefix_caching: bool = True,
    inject_device_loss_at_step: int = 0,
    dtype: str | None = None,
    packed_linears: bool = True,
    native_attention: bool = True,
    native_norm: bool = True,
) -> Engine:
    config = EngineConfig(
        model=str(path),
        device="cpu",
        dtype=dtype,
        cpu_packed_linears=packed_linears,
        cpu_native_attention=native_attention,
        cpu_native_norm=native_norm,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
        batcher=BatcherConfig(max_batched_tokens=max_batched_tokens, max_prefill_chunk=max_prefill_chunk),
        torch_threads=2,
        inject_device_loss_at_step=inject_device_loss_at_step,
    )
    return Engine.from_config(config)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step until idle; returns each request's generated token ids."""
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return tokens
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("engine did not finish")
