"""What one `pdmesh bench serve` invocation will do: the load points of its sweep and the
workload each of them sends. Built from the command line (bench/cli.py), recorded in the JSON."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pdmesh.bench.arrivals import arrival_times, time_scaled, with_arrivals
from pdmesh.bench.backend import Api, GenerationOptions
from pdmesh.bench.metrics import Slo
from pdmesh.bench.trace import TraceScaling, load_trace, trace_requests
from pdmesh.bench.workload import BenchRequest, LengthRange, PromptKind, RequestClass, SyntheticWorkload, Vocabulary


class LoadMode(enum.Enum):
    CONCURRENCY = "concurrency"  # closed loop: N requests in flight
    RATE = "rate"  # open loop: arrivals at a rate (requests/s), Poisson or gamma-bursty
    TRACE = "trace"  # open loop: a trace's arrivals, sped up by a factor

    @property
    def unit(self) -> str:
        return {"concurrency": "concurrent requests", "rate": "requests/s", "trace": "x trace speed"}[self.value]


@dataclass(frozen=True)
class LoadPoint:
    mode: LoadMode
    value: float  # concurrency, rate or speedup

    @property
    def label(self) -> str:
        v = "inf" if math.isinf(self.value) else f"{self.value:g}"
        return f"{self.mode.value}={v}"


@dataclass(frozen=True)
class BenchPlan:
    api: Api
    target: str
    points: tuple[LoadPoint, ...]
    num_requests: int | None  # None: every record of the trace
    input_len: LengthRange
    output_len: LengthRange
    prompt_kind: PromptKind
    options: GenerationOptions
    slo: Slo
    attainment_target_pct: float = 90.0
    max_concurrency: int | None = None  # a cap on open-loop runs
    burstiness: float = 1.0
    prefix_len: int = 0  # a shared prefix before each synthetic prompt
    prefix_groups: int = 1
    mix: tuple[RequestClass, ...] = ()  # request classes replacing input_len / output_len
    trace: Path | None = None
    trace_scaling: TraceScaling = TraceScaling()
    tokenizer: str | None = None  # a model name or path; None: the served model's
    vocab_size: int | None = None
    seed: int = 0
    warmup: int = 0
    out: Path | None = None
    plot: Path | None = None
    per_request: bool = True  # every request's record in the JSON
    token_times: bool = False  # and in each, every output token's arrival
    progress: bool = True
    api_key: str | None = dataclasses.field(default=None, repr=False)  # never written to the JSON

    @property
    def mode(self) -> LoadMode:
        return self.points[0].mode

    def point_seed(self, index: int) -> int:
        """Each point draws its own prompts: a repeat of the last point's would hit the prefix cache."""
        return int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])

    def requests(self, index: int, vocab: Vocabulary) -> list[BenchRequest]:
        """The requests of point `index`, arrival times included for open-loop modes."""
        point, seed = self.points[index], self.point_seed(index)
        if point.mode is LoadMode.TRACE:
            assert self.trace is not None
            records = load_trace(self.trace, self.num_requests)
            return time_scaled(trace_requests(records, vocab, self.trace_scaling, seed), point.value)
        n = self.num_requests or 0
        workload = SyntheticWorkload(
            n, self.input_len, self.output_len, self.prompt_kind, self.prefix_len, self.prefix_groups, self.mix
        )
        requests = workload.build(vocab, seed)
        if point.mode is LoadMode.RATE:
            return with_arrivals(requests, arrival_times(n, point.value, seed, self.burstiness))
        return requests

    def max_in_flight(self, point: LoadPoint) -> int | None:
        return int(point.value) if point.mode is LoadMode.CONCURRENCY else self.max_concurrency

    def to_json(self) -> dict[str, Any]:
        doc = _jsonable(dataclasses.asdict(self))
        doc["api_key"] = "(set)" if self.api_key else None
        return doc


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value
