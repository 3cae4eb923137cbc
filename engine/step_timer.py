"""Where a worker's step loop spends its time, by phase, cheap enough to stay on.

The engine times the phases of each step (plan, build inputs, launch, wait for the device and
sample, account for tokens); the async engine adds what surrounds the steps (commands, handing
outputs to callers, idle waits). The sums answer "is the device waiting for Python, or Python for
the device?" under real load: with CUDA graphs the launch is quick and `sample` is mostly the
device's own time, so the rest is host overhead the device sat idle through.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

_COMMANDS_SHOWN = 8  # kinds of command a summary lists


class Phase(enum.Enum):
    SCHEDULE = "schedule"  # the batcher's plan
    PREPARE = "prepare"  # host arrays built and queued to the device
    LAUNCH = "launch"  # the forward pass queued (eager) or replayed (graph)
    SAMPLE = "sample"  # waiting for the device, sampling, reading tokens back
    OUTPUT = "output"  # per-request accounting: detokenize, stop checks, outputs
    COMMANDS = "commands"  # add/abort/reserve/stats run between steps
    DISPATCH = "dispatch"  # outputs handed to the callers' event loops
    IDLE = "idle"  # nothing to do, or only KV imports in flight


class StepKind(enum.Enum):
    GRAPH = "graph"  # decode-only, replayed from a CUDA graph
    EAGER_DECODE = "eager_decode"  # decode-only, launched op by op
    PIECEWISE = "piecewise"  # prefill chunks in the batch, attention eager between captured pieces
    MIXED = "mixed"  # prefill chunks in the batch, launched op by op


@dataclass(slots=True)
class CommandTimes:
    """One kind of command's runs between steps."""

    count: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the step thread's (a wait for the device may spin: it counts here too)
    max_seconds: float = 0.0


@dataclass
class StepTimes:
    seconds: dict[Phase, float] = field(default_factory=lambda: dict.fromkeys(Phase, 0.0))
    cpu_seconds: dict[Phase, float] = field(default_factory=lambda: dict.fromkeys(Phase, 0.0))  # the step thread's
    steps: dict[StepKind, int] = field(default_factory=lambda: dict.fromkeys(StepKind, 0))
    step_seconds: dict[StepKind, float] = field(default_factory=lambda: dict.fromkeys(StepKind, 0.0))
    tokens: int = 0  # tokens computed (prefill and decode)
    sampled: int = 0  # tokens sampled
    # The COMMANDS phase by who asked (the command's function), so a summary names what runs between steps.
    commands: dict[str, CommandTimes] = field(default_factory=dict)

    def add(self, phase: Phase, seconds: float, cpu_seconds: float = 0.0) -> None:
        self.seconds[phase] += seconds
        self.cpu_seconds[phase] += cpu_seconds

    def add_step(self, kind: StepKind, seconds: float, tokens: int, sampled: int) -> None:
        self.steps[kind] += 1
        self.step_seconds[kind] += seconds
        self.tokens += tokens
        self.sampled += sampled

    def add_command(self, name: str, seconds: float, cpu_seconds: float) -> None:
        times = self.commands.get(name)
        if times is None:
            times = self.commands[name] = CommandTimes()
        times.count += 1
        times.seconds += seconds
        times.cpu_seconds += cpu_seconds
        times.max_seconds = max(times.max_seconds, seconds)

    def summary(self) -> dict[str, object]:
        """Totals in ms and mean ms per step of each kind, for a log line."""
        return {
            "phase_ms": {p.value: round(s * 1000, 1) for p, s in self.seconds.items()},
            "phase_cpu_ms": {p.value: round(s * 1000, 1) for p, s in self.cpu_seconds.items() if p is not Phase.IDLE},
            "steps": {k.value: n for k, n in self.steps.items() if n},
            "mean_step_ms": {k.value: round(self.step_seconds[k] / n * 1000, 2) for k, n in self.steps.items() if n},
            "tokens": self.tokens,
            "sampled": self.sampled,
            "commands": {  # the costliest first: name -> [count, ms, cpu ms, max ms]
                name: [t.count, *(round(s * 1000, 1) for s in (t.seconds, t.cpu_seconds, t.max_seconds))]
                for name, t in sorted(self.commands.items(), key=lambda item: -item[1].seconds)[:_COMMANDS_SHOWN]
            },
        }


class Stopwatch:
    """Laps of one step: each lap() charges the time since the previous one to a phase."""

    def __init__(self, times: StepTimes) -> None:
        self.times = times
        self.start = self._last = time.perf_counter()
        self._last_cpu = time.thread_time()

    def lap(self, phase: Phase) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.times.add(phase, now - self._last, cpu - self._last_cpu)
        self._last, self._last_cpu = now, cpu

    @property
    def elapsed(self) -> float:
        return self._last - self.start
