"""How wrong the forecasts have been lately, and the margin admission keeps for it.

The step models (predictor.py) predict the mean of the engine's work. A request admitted because
its mean forecast just fits its target misses it about half the time, and on a worker whose step
times swing with what else runs (a shared CPU, a noisy neighbour) "just fits" covers most
admissions. So the `slo` policy decides on an upper bound instead, learnt from outcomes: each
admitted request, when its first token is sent, yields a TTFT outcome — the forecast made at
placement and the time from placement to first token — kept per prefilling worker (a prefill
worker, or a decode worker for its local prefills); when it ends, a TPOT outcome per decode worker.

Over a worker's last `window` outcomes (pooled over all workers while it has fewer than
`min_samples` of its own):
1. a correction, measured ~ fixed + scale x forecast (least squares, both non-negative, the scale
   at least 1): what the forecasts miss systematically — the calls and hand-off around every
   request (fixed), a machine slower than its step samples said (scale). A ratio alone would read
   a 30 ms forecast that took 200 ms as "7x", and multiply a 3 s forecast by it;
2. the split-conformal quantile of measured / corrected: the ceil((n + 1) q)-th smallest of n,
   which a new outcome exceeds with probability about 1 - q while errors stay exchangeable.
The bound is quantile x corrected forecast. Requests admitted that missed raise it, hits lower
it: the window is the feedback. Before any outcome, the step model's own RMS relative error stands
in (1 + z x error, a normal quantile, on the forecast as it is).
"""

from __future__ import annotations

import math
from collections import deque
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
    min_samples: int = 8  # fewer of a worker's own: the pooled window decides
    ttft_floor_ms: float = 50.0  # no corrected TTFT forecast is taken as less (nor a ratio divided by less)
    tpot_floor_ms: float = 1.0
    prior_z: float = 1.645  # before outcomes: 1 + z * the step model's RMS relative error
    min_factor: float = 0.5  # the quantile's bounds: a corrected model that overestimates may admit more
    max_factor: float = 20.0


@dataclass(frozen=True, slots=True)
class Bound:
    """An upper bound of forecasts: factor x (fixed + scale x forecast), at least the floor."""

    fixed_ms: float = 0.0
    scale: float = 1.0
    factor: float = 1.0
    floor_ms: float = 0.0

    def ms(self, forecast_ms: float) -> float:
        return self.factor * max(self.floor_ms, self.fixed_ms + self.scale * forecast_ms)

    @property
    def slope(self) -> float:
        """How much the bound grows per millisecond of forecast (a queue's drain, a stall)."""
        return self.factor * self.scale


class Outcomes:
    """A bounded window of (forecast, measured) pairs and the bound they give, refitted only when
    one arrives and the bound is next read (placement reads it many times per outcome)."""

    def __init__(self, window: int) -> None:
        self.pairs: deque[tuple[float, float]] = deque(maxlen=window)
        self._bound: Bound | None = None

    def add(self, forecast_ms: float, measured_ms: float) -> None:
        self.pairs.append((forecast_ms, measured_ms))
        self._bound = None

    def __len__(self) -> int:
        return len(self.pairs)

    def bound(self, s: MarginSettings, floor_ms: float) -> Bound:
        if self._bound is None:
            x, y = np.array(self.pairs, dtype=np.float64).T
            fixed, scale = _correction(x, y)
            corrected = np.maximum(floor_ms, fixed + scale * x)
            ratios = np.sort(y / corrected)
            rank = min(len(ratios), math.ceil((len(ratios) + 1) * s.quantile))
            factor = min(s.max_factor, max(s.min_factor, float(ratios[rank - 1])))
            self._bound = Bound(fixed, scale, factor, floor_ms)
        return self._bound


def _correction(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """measured ~ fixed + scale x forecast by least squares, fixed >= 0 and scale >= 1 (a worker
    is never taken to be faster than its step samples: a window of small forecasts must not make
    a large one look cheap)."""
    if len(x) >= 3 and float(np.ptp(x)) > 0:
        scale, fixed = (float(c) for c in np.polyfit(x, y, 1))
        if fixed < 0:  # through the origin instead
            fixed, scale = 0.0, float(x @ y / (x @ x))
        if scale >= 1:
            return fixed, scale
    return max(0.0, float(np.mean(y - x))), 1.0  # scale 1: the mean excess


@dataclass
class Margins:
    """Every worker's recent TTFT and TPOT outcomes, and the bounds placement checks targets on."""

    settings: MarginSettings = field(default_factory=MarginSettings)
    _own: dict[tuple[Outcome, str], Outcomes] = field(default_factory=dict)
    _pooled: dict[Outcome, Outcomes] = field(default_factory=dict)

    def observe(self, kind: Outcome, worker_id: str, forecast_ms: float, measured_ms: float) -> None:
        """One admitted request's outcome on the worker its forecast was about."""
        if not (math.isfinite(forecast_ms) and math.isfinite(measured_ms)) or measured_ms < 0 or forecast_ms < 0:
            return
        window = self.settings.window
        self._own.setdefault((kind, worker_id), Outcomes(window)).add(forecast_ms, measured_ms)
        self._pooled.setdefault(kind, Outcomes(4 * window)).add(forecast_ms, measured_ms)

    def bound(self, kind: Outcome, worker_id: str, model_error: float = 0.0) -> Bound:
        """The worker's bound: from its own outcomes, else the pooled ones, else the model's error."""
        s = self.settings
        floor = s.ttft_floor_ms if kind is Outcome.TTFT else s.tpot_floor_ms
        outcomes = self._own.get((kind, worker_id))
        if outcomes is None or len(outcomes) < s.min_samples:
            outcomes = self._pooled.get(kind)
        if outcomes is not None and len(outcomes) >= s.min_samples:
            return outcomes.bound(s, floor)
        return Bound(factor=min(s.max_factor, 1.0 + s.prior_z * model_error), floor_ms=floor)

    def bound_ms(self, kind: Outcome, worker_id: str, forecast_ms: float, model_error: float = 0.0) -> float:
        return self.bound(kind, worker_id, model_error).ms(forecast_ms)

    def recent(self, kind: Outcome, worker_id: str) -> list[tuple[float, float]]:
        """The worker's own outcomes, (forecast, measured) oldest first."""
        outcomes = self._own.get((kind, worker_id))
        return [] if outcomes is None else list(outcomes.pairs)
