"""The KV pushes a prefill worker measured since its last load report: what the scheduler's
transfer predictor is fitted on. (Step samples come from the engine itself, engine/step_samples.py.)"""

from __future__ import annotations

from collections import deque


class Pushes:
    """Measured KV pushes (bytes, exposed ms) since the last load report, at most `capacity`."""

    def __init__(self, capacity: int = 1024) -> None:
        self._pushes: deque[tuple[int, float]] = deque(maxlen=capacity)

    def record(self, num_bytes: int, exposed_ms: float) -> None:
        self._pushes.append((num_bytes, exposed_ms))

    def take(self, limit: int) -> list[tuple[int, float]]:
        """The most recent `limit`; forgets all."""
        taken = list(self._pushes)[-limit:]
        self._pushes.clear()
        return taken
