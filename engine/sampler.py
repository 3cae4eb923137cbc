"""The sampler: one next token per request from a batch of logits.

Owns the logits processors (repetition penalty, temperature, top-k, top-p, min-p), the seeded
draw and the chosen token's log-probability. It refuses to know requests, stop conditions or the
model; parameters were validated at the door (`SamplingParams.validate`).

Design notes.
- Order, as in Hugging Face transformers: repetition penalty (HF semantics: a token present in
  the sequence has a positive logit divided by the penalty, any other multiplied by it), then
  temperature (at least sampling_params.MIN_TEMPERATURE: 1e-40 would overflow), top-k (ties with
  the k-th value survive), top-p (the smallest set whose probability reaches top_p, never empty)
  and min-p (drop tokens below min_p times the top probability). Greedy (temperature 0) takes the
  argmax of the penalised logits.
- Randomness per token comes from (seed, position) alone: a generator on the logits' device is
  seeded with a splitmix64 mix of the two, and the token is argmax(probs / E) with E ~ Exp(1)
  per vocabulary entry (the exponential race, equivalent to Gumbel-max). So a request sampled at
  a position draws the same token whatever else is in the batch, in whichever row, on whichever
  worker — provided the workers have the same device type and torch build: the CPU and CUDA
  generators give different streams, so a request moved between a CPU and a GPU worker continues
  with a different (equally valid) draw.
- Logprobs are log_softmax of the model's raw logits at the chosen token, before penalty and
  temperature (vLLM's default): they score the token under the model, not under the sampling
  recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs of one request for one step."""

    params: SamplingParams
    seed: int  # the request's seed; the engine draws one when params.seed is None
    position: int  # index, in prompt + output, of the token being sampled
    token_ids: Sequence[int]  # prompt + output so far (for the repetition penalty)


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]
    # Log-probability of each chosen token; None when no row asked (rows that did not ask may
    # still get a value).
    logprobs: list[float] | None


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN_GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, position: int) -> int:
    """The generator seed for (seed, position): element `position` of splitmix64's stream from seed.

    A plain seed + position would make request A at position p+1 draw what request A+1 drew at p.
    """
    return _splitmix64((_splitmix64(seed) + position * _GOLDEN_GAMMA) & _MASK64)


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(batch,) bool on the logits' device: False where a row holds NaN or +inf or no finite value."""
    return torch.isfinite(logits.amax(dim=-1))  # NaN propagates through amax, all -inf stays -inf


def check_finite(finite: Sequence[bool], rows: Sequence[SamplingRow]) -> None:
    """Raise if a row is not finite (finite_rows, read back): the model, not the request, is wrong."""
    if all(finite):
        return
    bad = list(finite).index(False)
    row = rows[bad]
    raise RuntimeError(
        f"sampler: logits row {bad} (seed {row.seed}, position {row.position}) holds NaN or +inf "
        "or no finite value; the model produced garbage for this request"
    )


def penalize(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition penalty, HF semantics, at most once per distinct token.

    Returns a new tensor, or `logits` itself when no row is penalised; never writes into `logits`.
    """
    penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and len(r.token_ids)]
    if not penalised:
        return logits
    # Through numpy: converting long Python lists is several times faster than torch.as_tensor.
    histories = [np.asarray(rows[i].token_ids, dtype=np.int64) for i in penalised]
    row_idx = np.repeat(np.asarray(penalised, dtype=np.int64), [len(h) for h in histories])
    index = torch.from_numpy(np.stack([row_idx, np.concatenate(histories)])).to(logits.device)  # (2, n)
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)  # (batch, vocab)
    seen[index[0], index[1]] = True
    penalty = torch.tensor([r.params.repetition_penalty for r in rows], device=logits.device)[:, None]
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over sampled (temperature > 0) rows, batched.

    logits: (batch, vocab) float32, already penalised. Returns (batch, vocab) probabilities with
    every dropped token at exactly 0 and at least one token (the argmax) kept per row.
    """
    batch, vocab = logits.shape
    table = torch.tensor(
        [[p.sampling_temperature, p.top_k or vocab, p.top_p, p.min_p] for p in params],
        dtype=torch.float32,
    ).to(logits.device)  # (batch, 4): one host-to-device copy for all rows
    x = logits / table[:, 0:1]
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        x = _top_k_top_p(x, table[:, 1].long().clamp(max=vocab), table[:, 2])
    probs = torch.softmax(x, dim=-1)
    if any(p.min_p > 0.0 for p in params):
        threshold = table[:, 3:4] * probs.amax(dim=-1, keepdim=True)  # (batch, 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) what top-k then top-p drop; top_k, top_p: (batch,), top_k in [1, vocab]."""
    # A stable sort keeps tie order by token id, so a row's result never depends on its batch.
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)  # (batch, vocab) each
    kth = sorted_x.gather(1, (top_k - 1)[:, None])  # (batch, 1)
    drop = sorted_x < kth
    sorted_probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the better tokens
    # top_p == 1 must drop nothing, even where rounding lets the running sum pass 1.
    drop |= (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    return x.masked_fill(drop.scatter(1, order, drop), float("-inf"))


class Sampler:
    """Turns (batch, vocab) logits into one token per row; see the module docstring for semantics.

    Keeps one generator per device and reseeds it for every row, so use one Sampler per thread.
    """

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampleOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"sampler: logits {tuple(logits.shape)} do not match {len(rows)} rows")
        raw = logits.float()  # (batch, vocab); the same tensor when already float32: never mutated
        finite = finite_rows(raw)
        penalised = penalize(raw, rows)
        tokens = penalised.argmax(dim=-1)  # (batch,): greedy rows keep this
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            subset = penalised if len(sampled) == len(rows) else penalised[sampled]
            tokens[sampled] = self._draw(subset, [rows[i] for i in sampled])
        # One read-back for the tokens and the finiteness check: each is a wait for the device.
        token_ids, finite_list = torch.stack([tokens, finite.to(tokens.dtype)]).tolist()
        check_finite([bool(f) for f in finite_list], rows)
        logprobs = None
        if any(r.params.logprobs for r in rows):
            chosen = torch.log_softmax(raw, dim=-1).gather(1, tokens[:, None])  # (batch, 1)
            logprobs = chosen.squeeze(1).tolist()
        return SampleOutput(token_ids=token_ids, logprobs=logprobs)

    def _draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Exponential race: argmax(probs / E), E ~ Exp(1) drawn from (seed, position) alone."""
        probs = filtered_probs(logits, [r.params for r in rows])  # (n, vocab)
        noise = torch.empty_like(probs)  # (n, vocab)
        generator = self._generator(probs.device)
        for i, row in enumerate(rows):
            generator.manual_seed(draw_seed(row.seed, row.position))
            noise[i].exponential_(generator=generator)
        # Exp(1) can come out as 0; the floor keeps a dropped token (prob 0) from scoring 0/0.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]
