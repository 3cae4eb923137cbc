"""Whether taking a prefix from the KV store pays: its predicted fetch time against the predicted
time to compute those tokens here, both measured online.

On one H200 the store served an 8k-token prefix (500 blocks, 1 GB) in ~1.6 s over tcp loopback,
while computing it took ~0.33 s: a store can make a request slower than no store at all. So before
a fetch the worker compares

    fetch_ms(bytes)  = the store's per-call overhead + bytes x its measured ms per MiB
    compute_ms(f, c) = f prompt tokens after c cached ones, at this engine's measured cost
                       (ms per prompt token + ns per attention pair, fitted to its own steps)

and fetches only when the fetch is faster. The gain compute - fetch is convex in the blocks
fetched (fetch time is linear in them, compute grows faster: later tokens attend more keys), so
the best prefix to fetch is all of it or nothing; the time a fetch may take (its timeout) caps it.

What it does not know it learns: from a store it has never measured it fetches a probe's worth
(8 MiB: a first fetch of 1 GB at 0.6 GB/s would cost that request 1.6 s), and the rest of the
prefix is computed; before its engine has computed anything it fetches what the fetch's time
allows. A store judged slow is probed again now and then with a small fetch, so that one that
became fast (or restarted elsewhere) is used again. A fetch that failed or timed out counts as at
least that slow.

Each route to a store is measured apart: over UCX (`address`) and, on the store's host, by copying
out of its memory mapped from /dev/shm (`route(address, shared=True)`). A mapped route's first
fetch, and its probes, take up to 1 GiB: its copy runs at memory speed (an 8k-token Llama-8B
prefix, 1 GB, is ~0.1 s at PCIe speed, ~0.3 s even from pageable memory), so trying it costs
little, while a small probe's time is mostly fixed costs (the fetch and release calls, the wait
for the engine's step) that, spread over 8 MiB, would read as a bandwidth several times too low
and keep the store unused. `FetchMode.ALWAYS`
turns the comparison off (every hit is fetched: what tests of the store's data path, or a
deployment that values saved compute over TTFT, want).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.step_samples import StepSample, StepShape
from services.linear_fit import LinearFit

MiB = 1 << 20
_EWMA = 0.3  # weight of a new store measurement: a few fetches move the estimate
_FORGET = 0.99  # per step sample: about the last 100 prompt steps fit the compute cost
_MIN_PROMPT_STEPS = 4  # prompt-computing steps seen before the compute cost counts as measured
_NO_PRIOR = np.zeros((1, 5))
_SHARED = " shm"  # marks a mapped route's key


class FetchMode(enum.Enum):
    WHEN_FASTER = "when_faster"  # fetch only what is predicted faster than computing it
    ALWAYS = "always"  # fetch every hit


class FetchReason(enum.Enum):
    FASTER = "faster"  # predicted faster than computing
    LEARNING = "learning"  # no measurement yet: the fetch measures
    PROBE = "probe"  # judged slower, but probed again (small) to notice a store that became fast
    SLOWER = "slower"  # predicted slower than computing: computed instead
    ALWAYS = "always"  # FetchMode.ALWAYS


@dataclass(frozen=True, slots=True)
class FetchPlan:
    num_blocks: int  # blocks of the store's part to fetch, from its start (0: compute them all)
    reason: FetchReason
    fetch_ms: float | None = None  # predicted, for all the blocks offered by the store
    compute_ms: float | None = None  # predicted, for the same tokens


class StoreSpeed:
    """One store's measured fetch cost: per-call overhead (its lookups' round trips) and ms per MiB
    (fetches, less that overhead), each a moving average."""

    def __init__(self) -> None:
        self.overhead_ms: float | None = None
        self.ms_per_mib: float | None = None
        self.measured_at = 0.0  # time.monotonic() of the last fetch measured

    def lookup_took(self, ms: float) -> None:
        self.overhead_ms = ms if self.overhead_ms is None else (1 - _EWMA) * self.overhead_ms + _EWMA * ms

    def fetch_took(self, num_bytes: int, ms: float, *, landed: bool, now: float) -> None:
        """A fetch's time from call to landing; one that failed or timed out after `ms` took at least that."""
        rate = max(0.0, ms - (self.overhead_ms or 0.0)) / max(num_bytes / MiB, 1e-9)
        if self.ms_per_mib is None:
            self.ms_per_mib = rate
        elif landed:
            self.ms_per_mib = (1 - _EWMA) * self.ms_per_mib + _EWMA * rate
        else:
            self.ms_per_mib = max(self.ms_per_mib, rate)
        self.measured_at = now

    def fetch_ms(self, num_bytes: int) -> float | None:
        if self.ms_per_mib is None:
            return None
        return (self.overhead_ms or 0.0) + self.ms_per_mib * num_bytes / MiB


class ComputeCost:
    """What computing prompt tokens costs this engine: a fit of its step times (engine.step_samples)
    on the step's shape, of which the prompt tokens' and attention pairs' coefficients are used."""

    def __init__(self) -> None:
        self._fit = LinearFit(_NO_PRIOR, 0.0, _FORGET)
        self._prompt_steps = 0
        self._coefficients: np.ndarray | None = None

    def observe(self, steps: Sequence[StepSample]) -> None:
        if not steps:
            return
        self._fit.add(np.array([s.shape.features() for s in steps]), np.array([s.duration_ms for s in steps]))
        self._prompt_steps += sum(1 for s in steps if s.shape.num_prefill_tokens > 0)
        self._coefficients = None

    def compute_ms(self, num_tokens: int, num_before: int) -> float | None:
        """Predicted ms to compute `num_tokens` prompt tokens after `num_before` computed ones."""
        if self._prompt_steps < _MIN_PROMPT_STEPS:
            return None
        if self._coefficients is None:
            self._coefficients = self._fit.coefficients(None)
        _, per_token, per_pair, _, _ = self._coefficients
        return float(per_token * num_tokens + per_pair * StepShape.attention_pairs(num_tokens, num_before))


@dataclass(frozen=True)
class FetchSettings:
    mode: FetchMode = FetchMode.WHEN_FASTER
    reprobe_s: float = 10.0  # a store judged slower is probed again after this long
    probe_bytes: int = 8 * MiB  # a probe's size (at least one block)
    shared_probe_bytes: int = 1024 * MiB  # a probe's size over a mapped route (the module says why)


class FetchPolicy:
    """Plans each fetch from the speeds measured so far; learns from every lookup and fetch."""

    def __init__(
        self, settings: FetchSettings, block_bytes: int, block_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.compute = ComputeCost()
        self._stores: dict[str, StoreSpeed] = {}
        self._clock = clock

    @staticmethod
    def route(address: str, shared: bool) -> str:
        """The key a route to a store is measured under: its address, marked when mapped."""
        return address + _SHARED if shared else address

    def store(self, address: str) -> StoreSpeed:
        if address not in self._stores:
            self._stores[address] = StoreSpeed()
        return self._stores[address]

    def fetch_took(self, address: str, num_blocks: int, ms: float, *, landed: bool) -> None:
        self.store(address).fetch_took(num_blocks * self.block_bytes, ms, landed=landed, now=self._clock())

    def plan(self, address: str, num_blocks: int, num_cached_tokens: int, budget_ms: float) -> FetchPlan:
        """How many of the store's `num_blocks` (after `num_cached_tokens` of the worker's own) to
        fetch, when a fetch may take at most `budget_ms`."""
        if self.settings.mode is FetchMode.ALWAYS:
            return FetchPlan(num_blocks, FetchReason.ALWAYS)
        speed = self.store(address)
        fetch_ms = speed.fetch_ms(num_blocks * self.block_bytes)
        compute_ms = self.compute.compute_ms(num_blocks * self.block_size, num_cached_tokens)
        if fetch_ms is None:  # a store never measured: a probe's worth measures it
            return FetchPlan(self._probe(address, num_blocks), FetchReason.LEARNING, fetch_ms, compute_ms)
        if compute_ms is None:  # an engine that has not computed yet: the store's part in time
            return FetchPlan(self._within(speed, num_blocks, budget_ms), FetchReason.LEARNING, fetch_ms, compute_ms)
        n = self._within(speed, num_blocks, budget_ms)
        if n > 0 and self._gain_ms(speed, n, num_cached_tokens) > 0:
            return FetchPlan(n, FetchReason.FASTER, fetch_ms, compute_ms)
        if self._clock() - speed.measured_at >= self.settings.reprobe_s:
            return FetchPlan(self._probe(address, num_blocks), FetchReason.PROBE, fetch_ms, compute_ms)
        return FetchPlan(0, FetchReason.SLOWER, fetch_ms, compute_ms)

    def _probe(self, address: str, num_blocks: int) -> int:
        probe = self.settings.shared_probe_bytes if address.endswith(_SHARED) else self.settings.probe_bytes
        return min(num_blocks, max(1, probe // self.block_bytes))

    def _within(self, speed: StoreSpeed, num_blocks: int, budget_ms: float) -> int:
        """The most of `num_blocks` predicted to land within `budget_ms`."""
        per_block = (speed.ms_per_mib or 0.0) * self.block_bytes / MiB
        room = budget_ms - (speed.overhead_ms or 0.0)
        if per_block <= 0:
            return num_blocks if room > 0 else 0
        return max(0, min(num_blocks, int(room / per_block)))

    def _gain_ms(self, speed: StoreSpeed, num_blocks: int, num_cached_tokens: int) -> float:
        compute = self.compute.compute_ms(num_blocks * self.block_size, num_cached_tokens) or 0.0
        fetch = speed.fetch_ms(num_blocks * self.block_bytes) or 0.0
        return compute - fetch
