"""Weighted non-negative least squares over exponentially forgotten normal equations: the fit
behind the scheduler's predictors (scheduler/predictor.py) and the worker's fetch policy
(worker/fetch_policy.py), so it lives where both services may import it; small and cheap enough to
update on each load report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_MS = 0.05  # floor of the relative-error weights: a step is never timed better than this


class LinearFit:
    """Non-negative weighted least squares over forgotten normal equations, toward a prior.

    The normal equations (X'X, X'y) make an update O(features^2) whatever the history, and the
    fit a small solve, done only when a prediction asks after new data. Every sample's weight
    decays by `forget` per later sample, so about 1 / (1 - forget) recent samples dominate. The
    prior (coefficients, or none) enters as `prior_weight` pseudo-samples per shape of
    `prior_shapes`, never forgotten.
    """

    def __init__(self, prior_shapes: np.ndarray, prior_weight: float, forget: float) -> None:
        n = prior_shapes.shape[1]
        self._shapes = prior_shapes
        self._prior_weight = prior_weight
        self._a = np.zeros((n, n))
        self._b = np.zeros(n)
        self._forget = forget
        self.num_samples = 0
        self._solved: tuple[tuple[float, ...] | None, np.ndarray] | None = None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Samples as rows of `x` (features) with targets `y` in ms, oldest first.

        Each is weighted by 1 / y^2: the fit minimises relative error. Timing noise is roughly
        proportional to the time, and a plain least squares would let a few long prompt steps
        decide every coefficient, leaving the fixed cost that dominates short decode steps to chance.
        """
        if len(y) == 0:
            return
        w = self._forget ** np.arange(len(y) - 1, -1, -1, dtype=np.float64) / np.maximum(y, MIN_MS) ** 2
        total = self._forget ** len(y)
        self._a = total * self._a + (x.T * w) @ x
        self._b = total * self._b + (x.T * w) @ y
        self.num_samples += len(y)
        self._solved = None

    def merge(self, other: LinearFit) -> None:
        """Add another fit's evidence (a pool of workers)."""
        self._a = self._a + other._a
        self._b = self._b + other._b
        self.num_samples += other.num_samples
        self._solved = None

    def coefficients(self, prior: Sequence[float] | None) -> np.ndarray:
        key = None if prior is None else tuple(prior)
        if self._solved is None or self._solved[0] != key:
            a, b = self._a, self._b
            if prior is not None and self._prior_weight > 0:
                y = self._shapes @ np.asarray(prior)
                w = self._prior_weight / np.maximum(y, MIN_MS) ** 2  # relative, as the samples
                a, b = a + (self._shapes.T * w) @ self._shapes, b + (self._shapes.T * w) @ y
            self._solved = (key, _nnls_normal(a, b))
        return self._solved[1]


def _nnls_normal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||Xc - y|| with c >= 0, from the normal equations a = X'X, b = X'y.

    Lawson-Hanson's active set on five unknowns: solve on the free set, and while a coefficient
    comes out negative, step back to the boundary and fix it at zero. Usually the unconstrained
    solution is already non-negative and one 5x5 solve is all it costs. Written here because the
    one library with an NNLS (scipy) is a large dependency for a 5x5 solve.
    """
    scale = np.sqrt(np.maximum(np.diag(a), 1e-30))  # columns of wildly different units
    a_s = a / np.outer(scale, scale)
    b_s = b / scale
    n = len(b)
    first = _solve(a_s, b_s)
    if np.all(first >= 0):
        return first / scale
    free = np.zeros(n, dtype=bool)
    c = np.zeros(n)
    for _ in range(3 * n):
        gradient = b_s - a_s @ c
        candidates = np.where(~free & (gradient > 1e-12))[0]
        if len(candidates) == 0:
            break
        free[candidates[np.argmax(gradient[candidates])]] = True
        while True:
            z = np.zeros(n)
            z[free] = _solve(a_s[free][:, free], b_s[free])
            if np.all(z[free] > 0):
                c = z
                break
            bad = free & (z <= 0)
            alpha = np.min(c[bad] / np.maximum(c[bad] - z[bad], 1e-30))
            c = c + alpha * (z - c)
            free &= c > 1e-12
            c[~free] = 0.0
    return c / scale


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # a coefficient no sample or prior exercises
        return np.linalg.lstsq(a, b, rcond=None)[0]
