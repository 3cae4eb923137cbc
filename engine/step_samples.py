"""What each engine step cost, in the terms the mesh's scheduler predicts with.

A step's time is, to a good approximation, linear in five numbers of its batch (StepShape): a
fixed cost, the prompt tokens it computes (the weight matmuls), the attention work of those prompt
tokens (each query token against every key it attends: quadratic in prompt length, which is what
makes long prompts slower than their token count says), the decode rows (one token each) and the
context those rows attend (decode attention reads every cached K/V: memory-bound and linear in
context). The engine records the shape and wall time of its steps; the worker sends a sample of
them with its load reports; the scheduler fits its predictors to them (services/scheduler/predictor.py).

Torch-free: the scheduler and the simulator build StepShapes too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepShape:
    """The work of one engine step."""

    num_prefill_tokens: int = 0  # prompt tokens computed (cached ones excluded)
    num_prefill_attention_pairs: int = 0  # sum over prompt chunks: query tokens x keys each attends
    num_decode_requests: int = 0  # rows generating one token
    num_decode_context_tokens: int = 0  # keys those rows attend, summed

    @staticmethod
    def attention_pairs(num_new: int, num_prefix: int) -> int:
        """Query-key pairs of `num_new` prompt tokens after `num_prefix` computed ones, causal: the
        i-th new token attends the prefix and the i new tokens up to itself. Summed over the chunks
        of a chunked prefill this is the same as for one chunk of the whole prompt."""
        return num_new * num_prefix + num_new * (num_new + 1) // 2

    @classmethod
    def of_chunks(cls, chunks: Iterable[tuple[int, int, bool]]) -> StepShape:
        """From (new tokens, tokens computed before, is a decode row) per scheduled chunk."""
        prefill = pairs = decodes = context = 0
        for num_new, num_prefix, decode in chunks:
            if decode:
                decodes += 1
                context += num_prefix + 1
            else:
                prefill += num_new
                pairs += cls.attention_pairs(num_new, num_prefix)
        return cls(prefill, pairs, decodes, context)

    def features(self) -> tuple[float, float, float, float, float]:
        """The regression's inputs, the fixed cost's 1 first (services/scheduler/predictor.py)."""
        return (
            1.0, float(self.num_prefill_tokens), float(self.num_prefill_attention_pairs),
            float(self.num_decode_requests), float(self.num_decode_context_tokens),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StepSample:
    shape: StepShape
    duration_ms: float


class StepRecorder:
    """The engine's recent steps, bounded; `take` hands a sample of them to the load reporter."""

    def __init__(self, capacity: int = 4096) -> None:
        self._steps: deque[StepSample] = deque(maxlen=capacity)

    def record(self, shape: StepShape, duration_ms: float) -> None:
        self._steps.append(StepSample(shape, duration_ms))

    def take(self, limit: int) -> list[StepSample]:
        """At most `limit` of the steps since the last take, spread evenly over them; forgets all.
        A sample is enough for a fit of five coefficients, and keeps a report small."""
        steps = list(self._steps)
        self._steps.clear()
        if len(steps) <= limit:
            return steps
        stride = len(steps) / limit
        return [steps[int(i * stride)] for i in range(limit)]
