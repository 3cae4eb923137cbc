"""The simulated requests: prompt and output lengths, prefix blocks, arrival times.

From a Mooncake trace (pdmesh.bench.trace: the same loader and length scaling as `pdmesh bench
serve`) or from drawn lengths (pdmesh.bench.workload.LengthRange). A prompt is a list of block
ids: the trace's hash ids where it has them (equal ids at the same position are a shared prefix),
ids of its own elsewhere. Arrivals are the trace's timestamps divided by a speed-up, or a seeded
Poisson / gamma-bursty process at a rate (pdmesh.bench.arrivals). More requests than the trace
holds replay it again after its end, each copy with ids of its own (a copy shares no prefix with
the one before: it is new traffic, not a replay the caches remember).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.ids import BlockHash
from pdmesh.bench.arrivals import arrival_times
from pdmesh.bench.trace import TraceRecord, TraceScaling
from pdmesh.bench.workload import LengthRange
from pdmesh.enums import Priority
from services.scheduler.prefix import PromptBlocks
from services.scheduler.prefix_index import PrefixIndex

_COPY_STRIDE = 1 << 40  # ids of a trace copy: record ids + copy * stride (traces hold far fewer ids)
_OWN = 1 << 60  # ids of blocks no other request shares


@dataclass(frozen=True, slots=True)
class SimRequest:
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]  # one id per prompt block (the last may be partial)
    priority: Priority = Priority.NORMAL


class TracePrompt(PromptBlocks):
    """A simulated request's prompt as placement sees it: no tokens, its block ids the hashes.
    Every simulated worker has the one layout, so the fingerprint is not needed and the block
    size is the trace's."""

    def __init__(self, request: SimRequest, block_tokens: int, index: PrefixIndex) -> None:
        super().__init__((), index)
        self._num_tokens = request.prompt_tokens
        reusable = (request.prompt_tokens - 1) // block_tokens  # never the block of the last token
        self._known = [BlockHash(b) for b in request.blocks[:reusable]]

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def hashes(self, fingerprint: str, block_size: int) -> list[BlockHash]:
        return self._known


@dataclass(frozen=True)
class Shape:
    """A request's lengths and blocks, before its arrival time is chosen."""

    prompt_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]
    timestamp_s: float  # in the trace (0 for drawn lengths)


def trace_shapes(records: list[TraceRecord], scaling: TraceScaling, count: int) -> list[Shape]:
    """`count` requests from the trace, copies after its end when it holds fewer."""
    block = scaling.block_tokens()
    span = (records[-1].timestamp_ms - records[0].timestamp_ms) / 1000 if len(records) > 1 else 1.0
    gap = span / len(records)  # a copy starts one mean gap after the previous copy's end
    shapes = []
    for i in range(count):
        copy, record = divmod(i, len(records))
        r = records[record]
        length = scaling.input_len(r)
        needed = math.ceil(length / block)
        ids = [h + copy * _COPY_STRIDE for h in r.hash_ids[:needed]]
        ids += [_OWN + i * 4096 + k for k in range(needed - len(ids))]
        t = (r.timestamp_ms - records[0].timestamp_ms) / 1000 + copy * (span + gap)
        shapes.append(Shape(length, scaling.output_len(r), tuple(ids), t))
    return shapes


def drawn_shapes(count: int, input_len: LengthRange, output_len: LengthRange, block: int, seed: int) -> list[Shape]:
    rng = np.random.default_rng([seed, 7])
    inputs, outputs = input_len.draw(rng, count), output_len.draw(rng, count)
    return [
        Shape(n, m, tuple(_OWN + i * 4096 + k for k in range(math.ceil(n / block))), 0.0)
        for i, (n, m) in enumerate(zip(inputs, outputs, strict=True))
    ]


def at_speedup(shapes: list[Shape], speedup: float) -> list[SimRequest]:
    """The trace's own arrivals, `speedup` times faster."""
    return [
        SimRequest(i, s.timestamp_s / speedup, s.prompt_tokens, s.output_tokens, s.blocks) for i, s in enumerate(shapes)
    ]


def at_rate(shapes: list[Shape], rate: float, burstiness: float, seed: int) -> list[SimRequest]:
    """Seeded Poisson (burstiness 1) or gamma arrivals at `rate` requests/s."""
    times = arrival_times(len(shapes), rate, seed, burstiness)
    return [
        SimRequest(i, t, s.prompt_tokens, s.output_tokens, s.blocks)
        for i, (s, t) in enumerate(zip(shapes, times, strict=True))
    ]


def native_rate(shapes: list[Shape]) -> float:
    """A trace's own request rate (requests/s over its span)."""
    span = max(s.timestamp_s for s in shapes) - min(s.timestamp_s for s in shapes)
    return len(shapes) / span if span > 0 else math.inf
