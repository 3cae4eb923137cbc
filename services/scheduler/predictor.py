"""What work costs on each worker: step-time and transfer models, calibrated online.

A worker's engine step takes, closely enough, a linear function of its shape (engine.step_samples:
a fixed cost, prompt tokens, prompt attention pairs, decode rows, decode context). TTFT and TPOT
are sums and means of such steps, so one model per worker predicts both: a prefill of u uncached
tokens after c cached ones is ceil(u / budget) steps carrying u tokens and pairs(u, c) pairs; a
decode step of b requests over C context tokens is one step of that shape. A KV push's exposed
time is linear in its bytes.

Calibration: each load report carries a sample of the worker's measured steps and pushes. A
`LinearFit` keeps their exponentially forgotten normal equations (recent behaviour wins; a worker
that slows down is seen within a few reports) on top of a prior that is never forgotten (a
profile's coefficients, as a handful of pseudo-samples), so a coefficient the worker's traffic
never exercises (prompt work on a decode worker that never prefills) keeps the prior's value
instead of becoming arbitrary. Coefficients are non-negative: no work makes a step faster.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.ma  # noqa: F401  # np.median and np.quantile import it on first use (their NaN check): 25-65 ms inside whichever placement came first

from engine.step_samples import StepSample, StepShape
from services.linear_fit import MIN_MS, LinearFit

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class StepModel:
    """Predicted step time = fixed + per-unit costs times the step's shape (units in the names)."""

    fixed_ms: float = 0.0
    ms_per_prefill_token: float = 0.0
    ns_per_attention_pair: float = 0.0
    ms_per_decode_request: float = 0.0
    us_per_decode_context_token: float = 0.0

    @property
    def coefficients(self) -> tuple[float, float, float, float, float]:
        """In milliseconds per unit of StepShape.features()."""
        return (
            self.fixed_ms, self.ms_per_prefill_token, self.ns_per_attention_pair / 1e6, self.ms_per_decode_request,
            self.us_per_decode_context_token / 1e3,
        )  # fmt: skip

    @classmethod
    def of_coefficients(cls, c: Sequence[float] | np.ndarray) -> StepModel:
        return cls(float(c[0]), float(c[1]), float(c[2]) * 1e6, float(c[3]), float(c[4]) * 1e3)

    def step_ms(self, shape: StepShape, num_steps: int = 1) -> float:
        """`num_steps` steps whose shapes sum to `shape`."""
        return (
            num_steps * self.fixed_ms
            + self.ms_per_prefill_token * shape.num_prefill_tokens
            + self.ns_per_attention_pair * 1e-6 * shape.num_prefill_attention_pairs
            + self.ms_per_decode_request * shape.num_decode_requests
            + self.us_per_decode_context_token * 1e-3 * shape.num_decode_context_tokens
        )

    def decode_step_ms(self, num_requests: int, num_context_tokens: int) -> float:
        if num_requests <= 0:
            return 0.0
        return self.step_ms(StepShape(0, 0, num_requests, num_context_tokens))

    def prefill_ms(
        self, num_uncached: int, num_cached: int, budget: int, decode_requests: int = 0, decode_context: int = 0
    ) -> float:
        """A prompt of `num_uncached` tokens to compute after `num_cached` cached ones, in chunks of
        at most `budget` tokens, each step also carrying a decode batch of the given size."""
        if num_uncached <= 0:
            return 0.0
        return self.step_ms(*prefill_steps(num_uncached, num_cached, budget, decode_requests, decode_context))


def prefill_steps(
    num_uncached: int, num_cached: int, budget: int, decode_requests: int = 0, decode_context: int = 0
) -> tuple[StepShape, int]:
    """The steps a prompt takes (StepModel.prefill_ms): their total shape and how many."""
    steps = math.ceil(num_uncached / max(1, budget))
    shape = StepShape(
        num_uncached, StepShape.attention_pairs(num_uncached, num_cached), decode_requests * steps,
        decode_context * steps,
    )  # fmt: skip
    return shape, steps


@dataclass(frozen=True, slots=True)
class TransferModel:
    """Exposed time of a KV push (what it adds to TTFT) = fixed + per-MiB cost."""

    fixed_ms: float = 0.0
    ms_per_mib: float = 0.0

    def transfer_ms(self, num_bytes: int) -> float:
        return self.fixed_ms + self.ms_per_mib * num_bytes / MiB


# Shapes the prior's pseudo-samples take: one that exercises each coefficient (and the fixed cost
# alone), so the prior pins every coefficient down by itself.
_STEP_PRIOR_SHAPES = np.array([
    s.features() for s in (
        StepShape(), StepShape(512, 0, 0, 0), StepShape(2048, StepShape.attention_pairs(2048, 14336), 0, 0),
        StepShape(0, 0, 32, 0), StepShape(0, 0, 8, 8 * 16384),
    )
])  # fmt: skip
_TRANSFER_PRIOR_SHAPES = np.array([[1.0, 0.0], [1.0, 256.0]])  # a tiny push and a 256 MiB one
REFIT_SAMPLES = 16  # a worker's model is refitted after this many new samples of its own
ERROR_AFTER_SAMPLES = 64  # its prediction error is tracked once its own model has seen this many
POOL_REFIT_MAX = 4096
# Samples a pool needs (without a configured profile) before its model as a whole counts as
# calibrated: a model fitted to a handful of steps can extrapolate wildly (on two H200s a prefill
# model fitted to the first few steps forecast 1,884,338 ms for a 4,513-token prompt and refused it
# as out of reach).
CALIBRATED_AFTER_SAMPLES = 64
# What one forecast needs to count: samples of each kind of work it forecasts (prompt steps for a
# prompt's, decode steps for a decode step's), not of the pool in all: on two H100s a decode model
# resting on the decode worker's first few steps forecast TPOT 3,807 ms while the prefill worker's
# prompt steps made the pool count as calibrated, and requests with a TPOT target were refused.
# 32: a kind's first steps may be compiling kernels; 32 outweigh them (the 1/y^2 weights: one 12 ms
# step weighs as much as 10^5 steps of 4 s).
CALIBRATED_KIND_SAMPLES = 32
# The idle worker's pace: the share of a worker's recent steps taken to have run with the device to
# themselves (their measured / predicted time, at this quantile, scales its forecasts to an idle
# worker's), over its last IDLE_WINDOW steps, once it has IDLE_AFTER_RATIOS of them.
IDLE_QUANTILE = 0.1
IDLE_WINDOW = 512
IDLE_AFTER_RATIOS = 32


@dataclass(frozen=True)
class CalibrationSettings:
    prior_weight: float = 2.0  # pseudo-samples per prior shape: small, so real samples win quickly
    forget: float = 0.998  # per sample: about the last 500 samples dominate


class WorkerPredictors:
    """One worker's step-time and transfer models, fitted to what it reports.

    The prior of each fit is its pool's model (every worker of the same device and model, see
    Calibration): a coefficient this worker's own traffic never exercises — prompt work on a decode
    worker that never prefilled — takes what its peers measured, not an arbitrary value.
    """

    def __init__(self, pool: PoolPredictors, settings: CalibrationSettings) -> None:
        self.pool = pool
        self._steps = LinearFit(_STEP_PRIOR_SHAPES, settings.prior_weight, settings.forget)
        self._transfers = LinearFit(_TRANSFER_PRIOR_SHAPES, settings.prior_weight, settings.forget)
        self._step_model: tuple[StepModel, int, StepModel] | None = None  # (pool's model, own samples, fit)
        self._transfer_model: tuple[TransferModel, int, TransferModel] | None = None
        self._forget = settings.forget
        self._square_error = 0.0  # forgotten mean of squared relative errors of samples against the model
        self._error_weight = 0.0
        self._ratios: deque[float] = deque(maxlen=IDLE_WINDOW)  # recent steps' measured / predicted
        self._idle_factor: float | None = None

    def observe(self, steps: Sequence[StepSample], transfers: Sequence[tuple[int, float]]) -> None:
        """A report's samples: engine steps, and pushes as (bytes, exposed ms)."""
        if steps:
            x = np.array([s.shape.features() for s in steps])
            y = np.array([s.duration_ms for s in steps])
            self._track_error(x, y)
            self._steps.add(x, y)
            self.pool.add_steps(steps, x, y)
        if transfers:
            x = np.array([[1.0, b / MiB] for b, _ in transfers])
            y = np.array([ms for _, ms in transfers])
            self._transfers.add(x, y)
            self.pool.transfers.add(x, y)
        self._refit_steps()
        self._refit_transfers()

    @property
    def relative_error(self) -> float:
        """RMS relative error of recent step samples against the model as it stood when they came:
        how far off a prediction is (the simulator draws step noise of this size)."""
        return float(np.sqrt(self._square_error / self._error_weight)) if self._error_weight else 0.0

    def _track_error(self, x: np.ndarray, y: np.ndarray) -> None:
        if self._steps.num_samples < ERROR_AFTER_SAMPLES:
            return  # against a model that has barely seen the worker, errors say nothing of the noise
        predicted = x @ np.asarray(self.step.coefficients)
        ratios = y / np.maximum(predicted, MIN_MS)
        self._ratios.extend(ratios.tolist())
        self._idle_factor = None
        errors = ((y - predicted) / np.maximum(predicted, MIN_MS)) ** 2
        decay = self._forget ** np.arange(len(y) - 1, -1, -1, dtype=np.float64)
        total = self._forget ** len(y)
        self._square_error = total * self._square_error + float(decay @ errors)
        self._error_weight = total * self._error_weight + float(decay.sum())

    @property
    def idle_factor(self) -> float:
        """What an idle worker's steps take against the model's forecast, at most 1: the model is fitted
        to steps under whatever load the worker had (on a shared CPU, other processes take the cores
        for part of each step), and the fastest of its recent steps (IDLE_QUANTILE of measured /
        predicted) are the ones that had the device to themselves. "Even an idle worker could not"
        (an OUT_OF_RANGE refusal) is judged on forecasts times this, never on the loaded fit alone."""
        if self._idle_factor is None:
            if len(self._ratios) < IDLE_AFTER_RATIOS:
                self._idle_factor = 1.0
            else:
                self._idle_factor = min(1.0, float(np.quantile(np.fromiter(self._ratios, float), IDLE_QUANTILE)))
        return self._idle_factor

    @property
    def step(self) -> StepModel:
        """The model as last refitted: placement reads it and never pays for a fit, which happens
        as reports arrive (observe)."""
        return self._step_model[2] if self._step_model is not None else self._refit_steps()

    @property
    def transfer(self) -> TransferModel:
        return self._transfer_model[2] if self._transfer_model is not None else self._refit_transfers()

    def _refit_steps(self) -> StepModel:
        """Refit when its pool's model changed or `REFIT_SAMPLES` of its own arrived since."""
        prior, n = self.pool.step, self._steps.num_samples
        fit = self._step_model
        if fit is None or fit[0] is not prior or n - fit[1] >= REFIT_SAMPLES:
            model = StepModel.of_coefficients(self._steps.coefficients(prior.coefficients))
            self._step_model = fit = (prior, n, model)
        return fit[2]

    def _refit_transfers(self) -> TransferModel:
        prior, n = self.pool.transfer, self._transfers.num_samples
        fit = self._transfer_model
        if fit is None or fit[0] is not prior or n - fit[1] >= REFIT_SAMPLES:
            c = self._transfers.coefficients((prior.fixed_ms, prior.ms_per_mib))
            self._transfer_model = fit = (prior, n, TransferModel(float(c[0]), float(c[1])))
        return fit[2]

    @property
    def num_step_samples(self) -> int:
        return self._steps.num_samples

    @property
    def calibrated(self) -> bool:
        """Whether its pool as a whole is (a profile, or CALIBRATED_AFTER_SAMPLES samples); whether
        one forecast counts is calibrated_for's to say."""
        return self.pool.calibrated

    def calibrated_for(self, shape: StepShape) -> bool:
        """Whether this worker's forecast of steps of (total) `shape` is evidence enough to refuse a
        request on (PoolPredictors.calibrated_for)."""
        return self.pool.calibrated_for(shape)

    @property
    def num_transfer_samples(self) -> int:
        return self._transfers.num_samples


class PoolPredictors:
    """The models of a pool of like workers (one device kind, one model), fitted to all their
    samples on top of the configured profile (none: the samples alone). The pool is every
    worker's prior and refitting it makes them all refit, so it refits only after a tenth more
    samples than its last fit saw (at least `REFIT_SAMPLES`, at most `POOL_REFIT_MAX`): often
    while it learns, rarely once it knows."""

    def __init__(
        self, step_prior: StepModel | None, transfer_prior: TransferModel | None, settings: CalibrationSettings
    ) -> None:
        self.steps = LinearFit(_STEP_PRIOR_SHAPES, settings.prior_weight, settings.forget)
        self.transfers = LinearFit(_TRANSFER_PRIOR_SHAPES, settings.prior_weight, settings.forget)
        self._step_prior = step_prior
        self._transfer_prior = transfer_prior
        self._step: tuple[int, StepModel] | None = None
        self._transfer: tuple[int, TransferModel] | None = None
        self.prompt_samples = 0  # samples of steps that computed prompt tokens
        self.decode_samples = 0  # ... that ran decode rows

    def add_steps(self, steps: Sequence[StepSample], x: np.ndarray, y: np.ndarray) -> None:
        self.steps.add(x, y)
        self.prompt_samples += sum(1 for s in steps if s.shape.num_prefill_tokens)
        self.decode_samples += sum(1 for s in steps if s.shape.num_decode_requests)

    @property
    def calibrated(self) -> bool:
        """A configured profile, or enough samples of its own that the fit spans real step shapes."""
        return self._step_prior is not None or self.steps.num_samples >= CALIBRATED_AFTER_SAMPLES

    def calibrated_for(self, shape: StepShape) -> bool:
        """Whether a forecast of `shape` is evidence: a configured profile, or
        CALIBRATED_KIND_SAMPLES samples of each kind of work it forecasts (prompt, decode). Only the
        samples count, never the prior: a guess is no reason to refuse, and the steps of what is
        admitted calibrate it. Within a kind the linear model extrapolates (a batch of 30 from
        batches of 1 to 3, non-negative coefficients): judging each forecast by the evidence along
        its own shape (x'(X'WX)^-1 x) was tried and refused nothing a real mesh had not already
        run, down to a KV-full decode worker's wait when its batches had all been of one request."""
        if self._step_prior is not None:
            return True
        if shape.num_prefill_tokens and self.prompt_samples < CALIBRATED_KIND_SAMPLES:
            return False
        return not (shape.num_decode_requests and self.decode_samples < CALIBRATED_KIND_SAMPLES)

    @property
    def step(self) -> StepModel:
        n = self.steps.num_samples
        if self._step is None or _pool_stale(self._step[0], n):
            prior = None if self._step_prior is None else self._step_prior.coefficients
            self._step = (n, StepModel.of_coefficients(self.steps.coefficients(prior)))
        return self._step[1]

    @property
    def transfer(self) -> TransferModel:
        n = self.transfers.num_samples
        if self._transfer is None or _pool_stale(self._transfer[0], n):
            p = self._transfer_prior
            c = self.transfers.coefficients(None if p is None else (p.fixed_ms, p.ms_per_mib))
            self._transfer = (n, TransferModel(float(c[0]), float(c[1])))
        return self._transfer[1]


def _pool_stale(fitted_at: int, now: int) -> bool:
    return now - fitted_at >= min(POOL_REFIT_MAX, max(REFIT_SAMPLES, fitted_at // 10)) or (now > 0 and fitted_at == 0)


class Calibration:
    """Every worker's predictors, pooled by (device, model); `prior_for` picks a pool's profile."""

    def __init__(
        self, settings: CalibrationSettings, step_prior: StepModel | None = None,
        transfer_prior: TransferModel | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self._priors = (step_prior, transfer_prior)
        self._pools: dict[tuple[str, str], PoolPredictors] = {}

    def for_worker(self, device: str, model: str) -> WorkerPredictors:
        pool = self._pools.get((device, model))
        if pool is None:
            pool = self._pools[(device, model)] = PoolPredictors(*self._priors, self.settings)
        return WorkerPredictors(pool, self.settings)
