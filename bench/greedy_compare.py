"""Telling a near-tie from a wrong token, when two greedy runs of the same prompt part ways.

Float32 does not make greedy decoding independent of the batch: a batch's size and make-up pick
other GEMM tilings, attention partitions (kernels/paged_attention.py sizes them by the batch) and
reduction orders, so the same logit comes out a few units in the last place apart, and where the
two best tokens are that close the argmax flips. The flatter the logits and the larger the
vocabulary, the likelier: an 8B-shaped random model has 128k tokens of nearly flat logits. A flip
is not corruption: up to the position where the runs part, each token's logprob agrees with the
other run's to float32 noise, and there the two different tokens have the same logprob to that
noise (each is its run's best). Wrong KV (a block written late, another request's block) moves the
logprobs by far more, from the first token it touches. RELIABILITY.md, "A near-tie or a wrong
token".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Far above float32's noise between two batchings (2.9e-6 nats on a 128k-vocabulary model on CPU:
# RELIABILITY.md), far below what a wrong block does to a logprob.
TIE_NATS = 1e-3


@dataclass(frozen=True)
class Divergence:
    """Where a run's greedy tokens first differ from the reference's, and by how much its logprobs do."""

    position: int  # the first token that differs
    prefix_nats: float  # the largest |logprob difference| over the tokens before it (0.0: none)
    at_nats: float  # |this run's chosen logprob - the reference's| at that position (inf: not known)

    def near_tie(self, tolerance: float = TIE_NATS) -> bool:
        """Both runs took their best token and those two tied to float32 noise."""
        return self.prefix_nats <= tolerance and self.at_nats <= tolerance


def diverges(
    tokens: Sequence[int],
    logprobs: Sequence[float],
    want: Sequence[int],
    want_logprobs: Sequence[float],
    *,
    whole: bool = True,
) -> Divergence | None:
    """None when `tokens` is `want` (whole) or a prefix of it (not whole); else where and how they
    part (a run that stops short of a whole `want` parts where it stopped). A position without a
    logprob on either side counts as an infinite difference: no near-tie can be claimed there."""
    position = next((i for i, (a, b) in enumerate(zip(tokens, want, strict=False)) if a != b), None)
    if position is None:
        if len(tokens) == len(want) or (len(tokens) < len(want) and not whole):
            return None
        position = min(len(tokens), len(want))
    prefix = max((_gap(logprobs, want_logprobs, i) for i in range(position)), default=0.0)
    return Divergence(position, prefix, _gap(logprobs, want_logprobs, position))


def noise_nats(
    tokens: Sequence[int], logprobs: Sequence[float], want: Sequence[int], want_logprobs: Sequence[float]
) -> float:
    """The largest |logprob difference| over the leading tokens both runs agree on."""
    agree = next((i for i, (a, b) in enumerate(zip(tokens, want, strict=False)) if a != b), min(len(tokens), len(want)))
    return max((_gap(logprobs, want_logprobs, i) for i in range(agree)), default=0.0)


def _gap(a: Sequence[float], b: Sequence[float], i: int) -> float:
    if i >= len(a) or i >= len(b):
        return float("inf")
    return abs(a[i] - b[i])
