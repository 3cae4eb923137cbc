"""Where simulated workers run their steps: each on its own device, or all on a few shared cores.

On GPUs every worker owns its device, and a step lasts what its work takes. A CPU mesh on one host
is different: its workers' engines share the host's cores (`pdmesh up --threads 1` gives each one
thread), so while more steps run than there are cores, each runs slower. `SharedCores` models this
as processor sharing: k steps at once on c cores each progress at min(1, c / k) of their own pace,
re-timed whenever one starts or ends. What else runs on the host (the scheduler, the load
generator, other programs) is not modelled: it is why a live mesh on a busy machine runs slower
than this predicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdmesh.sim.clock import EventLoop

Done = Callable[[float], None]  # called with the step's wall time, ms

_DONE_MS = 1e-6  # work left below this is rounding: the step is done


class Cores:
    """Dedicated devices: a step takes its own work's time."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop

    def run(self, work_ms: float, done: Done) -> None:
        self.loop.after(work_ms / 1000, lambda: done(work_ms))


@dataclass(slots=True, eq=False)
class _Job:
    left_ms: float  # work left, at full pace
    started: float  # virtual seconds
    done: Done


class SharedCores(Cores):
    """`cores` cores shared by every step (processor sharing)."""

    def __init__(self, loop: EventLoop, cores: float) -> None:
        super().__init__(loop)
        if cores <= 0:
            raise ValueError(f"shared cores: {cores}; use a positive number")
        self.cores = cores
        self._jobs: list[_Job] = []
        self._since = 0.0  # when the jobs' work left was last brought up to date
        self._generation = 0  # a completion event scheduled before the latest change is stale

    @property
    def pace(self) -> float:
        """Each running step's progress per unit of time."""
        return min(1.0, self.cores / len(self._jobs)) if self._jobs else 1.0

    def run(self, work_ms: float, done: Done) -> None:
        self._advance()
        self._jobs.append(_Job(work_ms, self.loop.now(), done))
        self._schedule()

    def _advance(self) -> None:
        now = self.loop.now()
        progress_ms = (now - self._since) * 1000 * self.pace
        for job in self._jobs:
            job.left_ms -= progress_ms
        self._since = now

    def _schedule(self) -> None:
        self._generation += 1
        if not self._jobs:
            return
        generation = self._generation
        soonest_ms = min(job.left_ms for job in self._jobs) / self.pace
        self.loop.after(max(0.0, soonest_ms) / 1000, lambda: self._complete(generation))

    def _complete(self, generation: int) -> None:
        if generation != self._generation:
            return
        self._advance()
        finished = [job for job in self._jobs if job.left_ms <= _DONE_MS]
        self._jobs = [job for job in self._jobs if job not in finished]
        self._schedule()
        now = self.loop.now()
        for job in finished:
            job.done((now - job.started) * 1000)
