"""How wrong the forecasts have been lately, and the margin admission keeps for it.

The step models (predictor.py) predict the mean of the engine's work. A request admitted because
its mean forecast just fits its target misses it about half the time, and on a worker whose step
times swing with what else runs (a shared CPU, a noisy neighbour) "just fits" covers most
admissions. So the `slo` policy decides on an upper bound instead, learnt from outcomes: each
admitted request, when its first token is sent, yields a TTFT outcome — the forecast made at
placement and the time from placement to first token — kept per prefilling worker (a prefill
worker, or a decode worker for its local prefills); when it ends, a TPOT outcome per decode worker.

Over a worker's outcomes of the last `horizon_s` (at most `window`; pooled over all workers while
it has fewer than `min_samples` of its own):
1. a correction: the median of measured - forecast, when positive — what every request pays
   beyond its steps (the calls, the hand-off, the scheduler's own turn on a busy core). A ratio
   alone would read a 30 ms forecast that took 200 ms as "7x" and multiply a 3 s forecast by it;
   the median keeps one outlier from moving it;
2. the split-conformal quantile of measured / corrected: the ceil((n + 1) q)-th smallest of n,
   which a new outcome exceeds with probability about 1 - q while errors stay exchangeable.
The bound is quantile x corrected forecast. Requests admitted that missed raise it, hits lower
it: the window is the feedback. Outcomes expire after `horizon_s`: an overload that has passed
must not keep refusing the large requests whose outcomes alone could show it passed (only what
is admitted is ever measured). Before any outcome, the step model's own RMS relative error stands
in (1 + z x error, a normal quantile, on the forecast as it is).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class Outcome(Enum):
    TTFT = "ttft"
    TPOT = "tpot"


@dataclass(frozen=True)
class MarginSettings:
    quantile: float = 0.95  # share of admitted requests whose measured time the bound should cover
    window: int = 64  # a worker's most recent outcomes the bound is learnt from
    horizon_s: float = 30.0  # outcomes older than this are forgotten
    min_samples: int = 8  # fewer of a worker's own: the pooled window decides
    ttft_floor_ms: float = 50.0  # no corrected TTFT forecast is taken as less (nor a ratio divided by less)
    tpot_floor_ms: float = 1.0
    prior_z: float = 1.645  # before outcomes: 1 + z * the step model's RMS relative error
    min_factor: float = 0.5  # the quantile's bounds: a corrected model that overestimates may admit more
    max_factor: float = 20.0


@dataclass(frozen=True, slots=True)
class Bound:
    """An upper bound of forecasts: factor x (fixed + forecast), at least the floor."""

    fixed_ms: float = 0.0
    factor: float = 1.0
    floor_ms: float = 0.0

    def ms(self, forecast_ms: float) -> float:
        return self.factor * max(self.floor_ms, self.fixed_ms + forecast_ms)

    @property
    def slope(self) -> float:
        """How much the bound grows per millisecond of forecast (a queue's drain, a stall)."""
        return self.factor


class Outcomes:
    """A window of (time, forecast, measured) outcomes and the bound they give, refitted only when
    the window changed and the bound is next read (placement reads it many times per outcome)."""

    def __init__(self, window: int) -> None:
        self.items: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._bound: Bound | None = None

    def add(self, now: float, forecast_ms: float, measured_ms: float) -> None:
        self.items.append((now, forecast_ms, measured_ms))
        self._bound = None

    def expire(self, before: float) -> None:
        while self.items and self.items[0][0] < before:
            self.items.popleft()
            self._bound = None

    def __len__(self) -> int:
        return len(self.items)

    def bound(self, s: MarginSettings, floor_ms: float) -> Bound:
        if self._bound is None:
            _, x, y = np.array(self.items, dtype=np.float64).T
            fixed = max(0.0, float(np.median(y - x)))
            ratios = np.sort(y / np.maximum(floor_ms, fixed + x))
            rank = min(len(ratios), math.ceil((len(ratios) + 1) * s.quantile))
            factor = min(s.max_factor, max(s.min_factor, float(ratios[rank - 1])))
            self._bound = Bound(fixed, factor, floor_ms)
        return self._bound


@dataclass
class Margins:
    """Every worker's recent TTFT and TPOT outcomes, and the bounds placement checks targets on."""

    settings: MarginSettings = field(default_factory=MarginSettings)
    clock: Callable[[], float] = time.monotonic
    _own: dict[tuple[Outcome, str], Outcomes] = field(default_factory=dict)
    _pooled: dict[Outcome, Outcomes] = field(default_factory=dict)

    def observe(self, kind: Outcome, worker_id: str, forecast_ms: float, measured_ms: float) -> None:
        """One admitted request's outcome on the worker its forecast was about."""
        if not (math.isfinite(forecast_ms) and math.isfinite(measured_ms)) or measured_ms < 0 or forecast_ms < 0:
            return
        now, window = self.clock(), self.settings.window
        self._own.setdefault((kind, worker_id), Outcomes(window)).add(now, forecast_ms, measured_ms)
        self._pooled.setdefault(kind, Outcomes(4 * window)).add(now, forecast_ms, measured_ms)

    def bound(self, kind: Outcome, worker_id: str, model_error: float = 0.0) -> Bound:
        """The worker's bound: from its own outcomes, else the pooled ones, else the model's error."""
        s = self.settings
        floor = s.ttft_floor_ms if kind is Outcome.TTFT else s.tpot_floor_ms
        outcomes = self._recent(self._own.get((kind, worker_id)))
        if outcomes is None or len(outcomes) < s.min_samples:
            outcomes = self._recent(self._pooled.get(kind))
        if outcomes is not None and len(outcomes) >= s.min_samples:
            return outcomes.bound(s, floor)
        return Bound(factor=min(s.max_factor, 1.0 + s.prior_z * model_error), floor_ms=floor)

    def bound_ms(self, kind: Outcome, worker_id: str, forecast_ms: float, model_error: float = 0.0) -> float:
        return self.bound(kind, worker_id, model_error).ms(forecast_ms)

    def recent(self, kind: Outcome, worker_id: str) -> list[tuple[float, float]]:
        """The worker's own unexpired outcomes, (forecast, measured) oldest first."""
        outcomes = self._recent(self._own.get((kind, worker_id)))
        return [] if outcomes is None else [(x, y) for _, x, y in outcomes.items]

    def _recent(self, outcomes: Outcomes | None) -> Outcomes | None:
        if outcomes is not None:
            outcomes.expire(self.clock() - self.settings.horizon_s)
        return outcomes
