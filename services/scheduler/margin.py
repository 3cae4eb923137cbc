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
it: the window is the feedback. Outcomes expire `horizon_s` after their forecast was made (at
placement; a first token that came 20 s late describes the mesh as it was when it was placed): an
overload that has passed must not keep refusing the large requests whose outcomes alone could show
it passed (only what is admitted is ever measured). Before any outcome, the step model's own RMS
relative error stands in (1 + z x error, a normal quantile, on the forecast as it is).

Cold start. Requests placed before the margins had `min_samples` outcomes were admitted on that
stand-in: a burst at a fresh mesh is admitted nearly whole, overloads it, and its first tokens come
seconds late. Their outcomes raise the bound at once (as they should: admission must slow down),
but they describe forecasts made with no margin, whose errors are not those of forecasts made
with one. So once a window holds `min_samples` outcomes of forecasts made under a learnt margin,
the earlier ones no longer count in it: the bound recovers as soon as that evidence says the
forecasts now hold, instead of after the whole horizon.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import numpy.ma  # noqa: F401  # np.median and np.quantile import it on first use (their NaN check): 25-65 ms inside whichever placement came first


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


@dataclass(frozen=True, slots=True)
class Scored:
    """One outcome: when its forecast was made, the forecast, what was measured, and whether the
    forecast was made under a learnt margin (not the cold start's stand-in)."""

    made_at: float
    forecast_ms: float
    measured_ms: float
    informed: bool = True


class Outcomes:
    """A window of outcomes and the bound they give, refitted only when the window changed and the
    bound is next read (placement reads it many times per outcome)."""

    def __init__(self, window: int) -> None:
        self.items: deque[Scored] = deque(maxlen=window)
        self._bound: Bound | None = None
        self._oldest = math.inf  # the earliest made_at held: expiry scans only when it has come

    def add(self, outcome: Scored) -> None:
        self.items.append(outcome)
        self._oldest = min(self._oldest, outcome.made_at)
        self._bound = None

    def expire(self, before: float) -> None:
        """Forget outcomes whose forecasts were made before `before` (they arrive out of that order)."""
        if self._oldest >= before:
            return
        kept = [o for o in self.items if o.made_at >= before]
        if len(kept) != len(self.items):
            self.items = deque(kept, maxlen=self.items.maxlen)
            self._bound = None
        self._oldest = min((o.made_at for o in kept), default=math.inf)

    def __len__(self) -> int:
        return len(self.items)

    def bound(self, s: MarginSettings, floor_ms: float) -> Bound:
        if self._bound is None:
            informed = [o for o in self.items if o.informed]
            scored = informed if len(informed) >= s.min_samples else self.items
            x = np.array([o.forecast_ms for o in scored], dtype=np.float64)
            y = np.array([o.measured_ms for o in scored], dtype=np.float64)
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
    _learnt_since: dict[Outcome, float] = field(default_factory=dict)  # bounds learnt from outcomes since

    def observe(
        self, kind: Outcome, worker_id: str, forecast_ms: float, measured_ms: float, made_at: float | None = None
    ) -> None:
        """One admitted request's outcome on the worker its forecast was about; `made_at`: when the
        forecast was made (its placement), now when not given."""
        if not (math.isfinite(forecast_ms) and math.isfinite(measured_ms)) or measured_ms < 0 or forecast_ms < 0:
            return
        now, window = self.clock(), self.settings.window
        made_at = now if made_at is None else min(made_at, now)
        self._learning(kind)
        since = self._learnt_since.get(kind)
        outcome = Scored(made_at, forecast_ms, measured_ms, informed=since is not None and made_at > since)
        self._own.setdefault((kind, worker_id), Outcomes(window)).add(outcome)
        self._pooled.setdefault(kind, Outcomes(4 * window)).add(outcome)

    def bound(self, kind: Outcome, worker_id: str, model_error: float = 0.0) -> Bound:
        """The worker's bound: from its own outcomes, else the pooled ones, else the model's error."""
        s = self.settings
        floor = s.ttft_floor_ms if kind is Outcome.TTFT else s.tpot_floor_ms
        outcomes = self._recent(self._own.get((kind, worker_id)))
        if outcomes is None or len(outcomes) < s.min_samples:
            outcomes = self._learning(kind)
        if outcomes is not None and len(outcomes) >= s.min_samples:
            return outcomes.bound(s, floor)
        return Bound(factor=min(s.max_factor, 1.0 + s.prior_z * model_error), floor_ms=floor)

    def _learning(self, kind: Outcome) -> Outcomes | None:
        """The pooled outcomes of `kind`, noting since when bounds have been learnt from them (at
        least `min_samples`): forecasts made before that were made on the stand-in."""
        pooled = self._recent(self._pooled.get(kind))
        if pooled is not None and len(pooled) >= self.settings.min_samples:
            self._learnt_since.setdefault(kind, self.clock())
        else:
            self._learnt_since.pop(kind, None)
        return pooled

    def bound_ms(self, kind: Outcome, worker_id: str, forecast_ms: float, model_error: float = 0.0) -> float:
        return self.bound(kind, worker_id, model_error).ms(forecast_ms)

    def recent(self, kind: Outcome, worker_id: str) -> list[tuple[float, float]]:
        """The worker's own unexpired outcomes, (forecast, measured) oldest first."""
        outcomes = self._recent(self._own.get((kind, worker_id)))
        return [] if outcomes is None else [(o.forecast_ms, o.measured_ms) for o in outcomes.items]

    def _recent(self, outcomes: Outcomes | None) -> Outcomes | None:
        if outcomes is not None:
            outcomes.expire(self.clock() - self.settings.horizon_s)
        return outcomes
