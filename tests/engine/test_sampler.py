"""The sampler, as the engine uses it: a batch of logits in, one token per request out.

Hugging Face transformers' logits processors are the oracle for what each knob keeps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine.sampler import Sampler, SamplingRow, filtered_probs, penalize
from engine.sampling_params import MIN_TEMPERATURE, SamplingParams

VOCAB = 64


def row(position: int = 10, seed: int = 1234, token_ids: tuple[int, ...] = (), **params: Any) -> SamplingRow:
    return SamplingRow(params=SamplingParams(**params), seed=seed, position=position, token_ids=token_ids)


def draw_alone(sampler: Sampler, logits: torch.Tensor, r: SamplingRow) -> int:
    return sampler.sample(logits, [r]).token_ids[0]


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def hf_kept(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF's chain for one row: the mask of tokens that survive, shape (vocab,)."""
    scores = TemperatureLogitsWarper(p.temperature)(None, logits[None].clone())  # type: ignore[arg-type]
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(None, scores)  # type: ignore[arg-type]
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)  # type: ignore[arg-type]
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)  # type: ignore[arg-type]
    return scores[0] > float("-inf")


# --- greedy and repetition penalty ------------------------------------------------------------


def test_a_greedy_batch_takes_the_argmax_of_every_row_and_reports_no_logprobs() -> None:
    logits = random_logits(6)
    out = Sampler().sample(logits, [row() for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs is None


def test_repetition_penalty_moves_the_greedy_choice_off_a_token_already_seen() -> None:
    logits = torch.full((1, 8), -5.0)
    logits[0, 3], logits[0, 5], logits[0, 6] = 2.0, 1.9, -1.0
    sampler = Sampler()
    assert sampler.sample(logits, [row(token_ids=(0, 6))]).token_ids == [3]
    # 3 was seen: 2.0 / 1.2 = 1.67 now loses to 1.9; the seen negative 6 sinks further (-1.2).
    assert sampler.sample(logits, [row(token_ids=(3, 3, 6), repetition_penalty=1.2)]).token_ids == [5]
    penalised = penalize(logits, [row(token_ids=(3, 3, 6), repetition_penalty=1.2)])
    assert penalised[0, 3].item() == pytest.approx(2.0 / 1.2)
    assert penalised[0, 6].item() == pytest.approx(-1.2)
    assert penalised[0, 5].item() == logits[0, 5].item()  # unseen: untouched


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_matches_hugging_face_on_random_logits(penalty: float) -> None:
    logits = random_logits(4, seed=1)
    gen = torch.Generator().manual_seed(2)
    history = torch.randint(0, VOCAB, (4, 40), generator=gen)  # repeats included
    rows = [row(token_ids=tuple(h.tolist()), repetition_penalty=penalty) for h in history]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(penalize(logits, rows), expected)


def test_greedy_rows_in_a_mixed_batch_still_take_the_penalised_argmax() -> None:
    logits = random_logits(3, seed=3)
    top = logits.argmax(dim=-1)
    rows = [
        row(),
        row(temperature=1.0),
        row(token_ids=(int(top[2]),), repetition_penalty=100.0),
    ]
    out = Sampler().sample(logits, rows)
    assert out.token_ids[0] == int(top[0])
    assert out.token_ids[2] != int(top[2])
    assert out.token_ids[2] == int(penalize(logits, rows)[2].argmax())


# --- the filters against HF ------------------------------------------------------------------

FILTER_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.5, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.6),
    SamplingParams(temperature=2.0, top_k=30, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_p=0.95, min_p=0.2),
    SamplingParams(temperature=1.0, top_k=VOCAB + 10),
]


def test_each_row_of_a_mixed_batch_keeps_exactly_the_tokens_hugging_face_keeps() -> None:
    logits = random_logits(len(FILTER_CASES), seed=4)
    probs = filtered_probs(logits, FILTER_CASES)
    for i, params in enumerate(FILTER_CASES):
        kept = hf_kept(logits[i], params)
        assert torch.equal(probs[i] > 0, kept), params
        # The kept tokens carry the temperature-scaled softmax, renormalised or not.
        scaled = torch.softmax(logits[i] / params.temperature, dim=-1)
        torch.testing.assert_close(probs[i][kept] / probs[i][kept].sum(), scaled[kept] / scaled[kept].sum())


def test_top_k_of_one_samples_the_greedy_token() -> None:
    logits = random_logits(8, seed=5)
    rows = [row(position=p, seed=p * 7, temperature=1.5, top_k=1) for p in range(8)]
    assert Sampler().sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_a_tiny_top_p_keeps_only_the_argmax() -> None:
    logits = random_logits(8, seed=6)
    rows = [row(position=p, temperature=1.0, top_p=1e-6) for p in range(8)]
    assert Sampler().sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-5, 1e-40, 5e-324])
def test_a_positive_temperature_below_the_floor_samples_at_the_floor(temperature: float) -> None:
    # Dividing by 1e-40 overflows float32: every probability would be NaN and the draw garbage.
    logits = random_logits(8, seed=9)
    logits[:, 3] = logits[:, 17] = logits.amax(dim=-1) + 1.0  # a tie at the top, which the floor still samples
    tiny = [row(position=p, seed=p, temperature=temperature, top_p=0.95) for p in range(8)]
    floor = [row(position=p, seed=p, temperature=MIN_TEMPERATURE, top_p=0.95) for p in range(8)]
    probs = filtered_probs(logits, [r.params for r in tiny])
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(dim=-1), torch.ones(8))
    drawn = Sampler().sample(logits, tiny).token_ids
    assert drawn == Sampler().sample(logits, floor).token_ids
    assert set(drawn) <= {3, 17}
    assert not SamplingParams(temperature=temperature).greedy  # sampled (seeded), not turned greedy


def test_min_p_of_one_keeps_only_the_tokens_tied_at_the_top() -> None:
    logits = torch.zeros(200, 6)
    logits[:, 1] = logits[:, 4] = 3.0  # a tie at the top; the rest would be drawn often otherwise
    rows = [row(position=p, temperature=5.0, min_p=1.0) for p in range(200)]
    assert set(Sampler().sample(logits, rows).token_ids) == {1, 4}


# --- seeded randomness ------------------------------------------------------------------------


def test_a_seeded_batch_reproduces_exactly() -> None:
    logits = random_logits(16, seed=7)
    rows = [row(position=100 + i, seed=42, temperature=1.0) for i in range(16)]
    first = Sampler().sample(logits, rows).token_ids
    assert Sampler().sample(logits, rows).token_ids == first
    assert len(set(first)) > 4  # these draws really are random


def test_a_request_draws_the_same_token_alone_or_at_another_row_of_a_batch() -> None:
    sampler = Sampler()
    logits = random_logits(8, seed=8)
    for seed in range(20):
        batch = [row(position=33, seed=1000 + j, temperature=1.0, top_p=0.9) for j in range(8)]
        mine = row(position=57, seed=seed, temperature=1.0, top_p=0.9)
        batch[5] = mine
        in_batch = sampler.sample(logits, batch).token_ids[5]
        assert draw_alone(sampler, logits[5:6].clone(), mine) == in_batch


def test_the_same_seed_at_different_positions_draws_differently() -> None:
    logits = torch.zeros(1, 1000)  # uniform: equal draws would be a coincidence of 1 in 1000
    sampler = Sampler()
    draws = [draw_alone(sampler, logits, row(position=p, seed=9, temperature=1.0)) for p in range(20)]
    assert len(set(draws)) >= 18
    # Neighbouring seeds are not shifted copies of each other (what seed + position would give).
    shifted = [
        draw_alone(sampler, logits, row(position=p - 1, seed=10, temperature=1.0)) for p in range(1, 20)
    ]
    assert sum(a == b for a, b in zip(draws[1:], shifted, strict=True)) <= 2


def test_draws_follow_the_softmax_distribution() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    expected = torch.softmax(logits[0], dim=-1)
    n = 4000
    rows = [row(position=p, seed=2024, temperature=1.0) for p in range(n)]
    tokens = torch.tensor(Sampler().sample(logits.expand(n, -1), rows).token_ids)
    counts = torch.bincount(tokens, minlength=5).double()
    chi_square = float((((counts - n * expected) ** 2) / (n * expected)).sum())
    assert chi_square < 18.47  # 99.9th percentile of chi-square with 4 degrees of freedom


# --- logprobs, dtypes, garbage ----------------------------------------------------------------


def test_logprobs_score_the_chosen_token_under_the_raw_logits() -> None:
    logits = random_logits(4, seed=11)
    rows = [
        row(logprobs=True),
        row(position=3, temperature=0.6, top_k=10, logprobs=True),
        row(token_ids=(1, 2, 3), repetition_penalty=1.5, temperature=1.2, logprobs=True),
        row(temperature=1.0),  # did not ask; may still get a value
    ]
    out = Sampler().sample(logits, rows)
    assert out.logprobs is not None
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(4), torch.tensor(out.token_ids)]
    assert out.logprobs[:3] == pytest.approx(expected[:3].tolist(), abs=1e-6)


def test_bf16_logits_sample_like_their_float32_copy() -> None:
    logits = random_logits(4, seed=12).bfloat16()
    rows = [row(position=p, temperature=1.0, top_p=0.9) for p in range(4)]
    assert Sampler().sample(logits, rows).token_ids == Sampler().sample(logits.float(), rows).token_ids


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_a_row_of_garbage_logits_names_the_row(poison: float) -> None:
    logits = random_logits(3, seed=13)
    logits[1, 7] = poison
    with pytest.raises(RuntimeError, match="row 1 "):
        Sampler().sample(logits, [row(), row(), row()])


def test_a_row_with_every_logit_at_minus_infinity_names_the_row() -> None:
    logits = random_logits(3, seed=14)
    logits[2] = float("-inf")
    with pytest.raises(RuntimeError, match="row 2 "):
        Sampler().sample(logits, [row(temperature=1.0) for _ in range(3)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_request_draws_the_same_token_in_any_batch_and_greedy_matches_cpu() -> None:
    sampler = Sampler()
    logits = (torch.randn(8, 151_936, generator=torch.Generator().manual_seed(15)) * 4).cuda()
    for seed in range(50):
        batch = [row(position=33, seed=1000 + j, temperature=0.8, top_k=50, top_p=0.95) for j in range(8)]
        mine = row(position=57, seed=seed, temperature=0.8, top_p=0.95, min_p=0.01)
        batch[seed % 8] = mine
        in_batch = sampler.sample(logits, batch).token_ids[seed % 8]
        assert draw_alone(sampler, logits[seed % 8 : seed % 8 + 1].clone(), mine) == in_batch
        assert sampler.sample(logits, batch).token_ids[seed % 8] == in_batch
    greedy = [row() for _ in range(8)]
    assert sampler.sample(logits, greedy).token_ids == sampler.sample(logits.cpu(), greedy).token_ids
    assert sampler.sample(logits.bfloat16(), greedy).token_ids == logits.bfloat16().argmax(-1).tolist()
