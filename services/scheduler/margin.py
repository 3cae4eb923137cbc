"""How wrong the forecasts have been lately, and the margin admission keeps for it.

The step models (predictor.py) predict the mean. A request admitted because its mean forecast just
fits its target misses it about half the time, and on a worker whose step times swing with what
else runs (a shared CPU, a noisy neighbour) "just fits" covers most admissions. So the `slo`
policy decides on an upper bound instead: the forecast times a calibrated factor that recent
outcomes say covers the truth with the configured probability (split conformal prediction on
relative errors).

Each admitted request, when its first token is sent, yields a TTFT score — the measured time from
placement to first token over the TTFT the policy predicted at placement — kept per prefilling
worker (a prefill worker, or a decode worker for its local prefills); when it ends, a TPOT score
(measured over predicted) per decode worker. A worker's factor is the conformal quantile of its
last `window` scores: the ceil((n + 1) q)-th smallest of n, which a new score exceeds with
probability at most 1 - q when errors are exchangeable. Requests that were admitted and missed
raise it, hits lower it: the feedback is the window itself. A worker with too few scores of its
own takes every worker's pooled window; before any outcome, the step model's own RMS relative error
(1 + z * error, a normal quantile) stands in.

A TTFT forecast smaller than `ttft_floor_ms` is scored against that floor: a 5 ms forecast that
took 60 ms (the calls around it) says little about a 3 s one, and would otherwise inflate every
worker's factor.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class Outcome(Enum):
    TTFT = "ttft"
    TPOT = "tpot"


@dataclass(frozen=True)
class MarginSettings:
    quantile: float = 0.95  # share of admitted requests whose measured time the bound should cover
    window: int = 64  # a worker's most recent scores the quantile is taken over
    min_samples: int = 8  # fewer of a worker's own: its role's pooled window decides
    ttft_floor_ms: float = 50.0  # TTFT forecasts below this are scored (and bounded) as this
    tpot_floor_ms: float = 1.0
    prior_z: float = 1.645  # before outcomes: 1 + z * the step model's RMS relative error
    min_factor: float = 0.5  # a model that overestimates may admit more, within reason
    max_factor: float = 20.0


class Scores:
    """A bounded window of recent scores and its conformal quantile, recomputed only when a score
    arrives (placement reads it many times per report)."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self._quantile: tuple[float, float] | None = None  # (q, value) as last computed

    def add(self, score: float) -> None:
        self.values.append(score)
        self._quantile = None

    def __len__(self) -> int:
        return len(self.values)

    def quantile(self, q: float) -> float:
        """The ceil((n + 1) q)-th smallest score (the largest when that passes n)."""
        if self._quantile is None or self._quantile[0] != q:
            ordered = sorted(self.values)
            rank = min(len(ordered), math.ceil((len(ordered) + 1) * q))
            self._quantile = (q, ordered[max(0, rank - 1)])
        return self._quantile[1]


@dataclass
class Margins:
    """Every worker's recent TTFT and TPOT scores, and the factors placement bounds forecasts by."""

    settings: MarginSettings = field(default_factory=MarginSettings)
    _own: dict[tuple[Outcome, str], Scores] = field(default_factory=dict)
    _pooled: dict[Outcome, Scores] = field(default_factory=dict)

    def observe(self, kind: Outcome, worker_id: str, predicted_ms: float, measured_ms: float) -> None:
        """One admitted request's outcome on the worker its forecast was about."""
        if not (math.isfinite(predicted_ms) and math.isfinite(measured_ms)) or measured_ms < 0:
            return
        score = measured_ms / max(predicted_ms, self._floor(kind))
        window = self.settings.window
        self._own.setdefault((kind, worker_id), Scores(window)).add(score)
        self._pooled.setdefault(kind, Scores(4 * window)).add(score)

    def factor(self, kind: Outcome, worker_id: str, model_error: float = 0.0) -> float:
        """What to multiply the worker's forecast by for an upper bound (at least the floor is
        forecast): its own scores' quantile, else the pooled one, else the model's error."""
        s = self.settings
        scores = self._own.get((kind, worker_id))
        if scores is None or len(scores) < s.min_samples:
            scores = self._pooled.get(kind)
        if scores is not None and len(scores) >= s.min_samples:
            value = scores.quantile(s.quantile)
        else:
            value = 1.0 + s.prior_z * model_error
        return min(s.max_factor, max(s.min_factor, value))

    def bound_ms(self, kind: Outcome, worker_id: str, predicted_ms: float, model_error: float = 0.0) -> float:
        """The forecast's upper bound: `quantile` of outcomes like it are predicted to come in under it."""
        return self.factor(kind, worker_id, model_error) * max(predicted_ms, self._floor(kind))

    def recent(self, kind: Outcome, worker_id: str) -> list[float]:
        """The worker's own scores, oldest first."""
        scores = self._own.get((kind, worker_id))
        return [] if scores is None else list(scores.values)

    def _floor(self, kind: Outcome) -> float:
        return self.settings.ttft_floor_ms if kind is Outcome.TTFT else self.settings.tpot_floor_ms
