"""Mooncake-format traces: one JSON object a line with `timestamp` (ms from the trace's start),
`input_length`, `output_length` and `hash_ids` (one id per 512-token prompt block; equal ids at
the same positions mean a shared prefix).

Prompts are rebuilt so the sharing survives: the block for hash id h is the same random token
ids wherever h appears (drawn from (seed, h)), and a prompt is its blocks concatenated, cut to its
length. Scaling lengths by `input_scale` scales the block size with them (512 * 0.1 -> 51
tokens a block), so a scaled prompt still shares exactly the blocks it shared before. Time is
scaled at replay (arrivals.time_scaled).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdmesh.bench.workload import BenchRequest, Vocabulary

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True, slots=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: Path, limit: int | None = None) -> list[TraceRecord]:
    """The first `limit` records (all when None); ValueError names the line that is malformed."""
    records: list[TraceRecord] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(records) >= limit:
                break
            records.append(_record(path, number, line))
    if not records:
        raise ValueError(f"--trace: {path} holds no requests; pass a Mooncake-format JSONL file")
    return records


def _record(path: Path, number: int, line: str) -> TraceRecord:
    try:
        raw = json.loads(line)
        return TraceRecord(
            timestamp_ms=float(raw["timestamp"]),
            input_length=int(raw["input_length"]),
            output_length=int(raw["output_length"]),
            hash_ids=tuple(int(h) for h in raw.get("hash_ids", ())),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"--trace: {path} line {number} is not a Mooncake record ({e!r}); each line needs "
            "timestamp, input_length, output_length and hash_ids"
        ) from None


@dataclass(frozen=True)
class TraceScaling:
    input_scale: float = 1.0  # prompt lengths and the block size
    output_scale: float = 1.0

    def block_tokens(self) -> int:
        return max(1, round(MOONCAKE_BLOCK_TOKENS * self.input_scale))

    def input_len(self, record: TraceRecord) -> int:
        return max(1, round(record.input_length * self.input_scale))

    def output_len(self, record: TraceRecord) -> int:
        return max(1, round(record.output_length * self.output_scale))


class BlockTable:
    """The token ids of each hash id's block, drawn once from (seed, hash id)."""

    def __init__(self, vocab: Vocabulary, block_tokens: int, seed: int) -> None:
        self._vocab = vocab
        self._allowed = vocab.allowed_ids()
        self._block_tokens = block_tokens
        self._seed = seed
        self._blocks: dict[tuple[int, ...], tuple[int, ...]] = {}

    def block(self, key: tuple[int, ...]) -> tuple[int, ...]:
        """The block of a trace hash id `(0, h)`, or of `(1, request, k)`, a key no other request uses.
        The leading tag keeps the two apart: numpy's seeding ignores trailing zeros."""
        block = self._blocks.get(key)
        if block is None:
            rng = np.random.default_rng([self._seed, *(k & (2**63 - 1) for k in key)])
            block = self._blocks[key] = self._vocab.random_ids(rng, self._block_tokens, self._allowed)
        return block


def trace_requests(
    records: list[TraceRecord], vocab: Vocabulary, scaling: TraceScaling, seed: int
) -> list[BenchRequest]:
    """One request per record, arrival at its timestamp, prompt rebuilt from its hash ids."""
    table = BlockTable(vocab, scaling.block_tokens(), seed)
    requests = []
    for i, record in enumerate(records):
        length = scaling.input_len(record)
        needed = math.ceil(length / scaling.block_tokens())
        # Rounding the block size can ask for more blocks than the record names: those are unique
        # to this request (their own key), so they share nothing new.
        keys: list[tuple[int, ...]] = [(0, h) for h in record.hash_ids[:needed]]
        keys += [(1, i, k) for k in range(needed - len(keys))]
        prompt = tuple(t for key in keys for t in table.block(key))[:length]
        requests.append(BenchRequest(i, prompt, length, scaling.output_len(record), record.timestamp_ms / 1000.0))
    return requests
