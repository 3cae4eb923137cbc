"""What a benchmark sends: prompts and output lengths, reproducible from a seed.

Prompts are random token ids (what a random-weight model needs: no text to tokenize, exact
lengths) or text (random vocabulary decoded, then re-encoded and cut to the length, so it is
about that many tokens; the server's usage gives the exact count). Lengths are fixed ("256") or
drawn uniformly from a range ("128:512"); a mix of request classes ("8192/32,256/1024": long
prompts with short answers among short prompts with long answers) draws each request's class
first, by the classes' weights. Special token ids (BOS, EOS, ...) never appear in a
random prompt, so a prompt never ends itself early.

Arrival times are not chosen here (see arrivals.py; traces carry their own).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.tokenizer import Tokenizer


class PromptKind(enum.Enum):
    TOKENS = "tokens"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to send. `prompt` is token ids or text; `prompt_len` counts tokens (for text,
    as this side's tokenizer counts them); `arrival_s` is set by open-loop load models."""

    index: int
    prompt: tuple[int, ...] | str
    prompt_len: int
    output_len: int
    arrival_s: float | None = None


@dataclass(frozen=True)
class LengthRange:
    """A token count, fixed (low == high) or uniform over [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, name: str) -> LengthRange:
        """'256' or '128:512'; ValueError names the option."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a token count; use N or LOW:HIGH, e.g. 256 or 128:512") from None
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
            raise ValueError(f"{name}: {text!r} is not a range; use N or LOW:HIGH with 1 <= LOW <= HIGH")
        return cls(parts[0], parts[1])

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(x) for x in rng.integers(self.low, self.high + 1, size=n)]

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in a mix: its prompt and output lengths, and its share by weight."""

    input_len: LengthRange
    output_len: LengthRange
    weight: float = 1.0

    @classmethod
    def parse_mix(cls, text: str, name: str = "--mix") -> tuple[RequestClass, ...]:
        """'IN/OUT[@WEIGHT],...', IN and OUT each N or LOW:HIGH; ValueError names the option."""
        classes = tuple(cls._parse_one(part.strip(), name) for part in text.split(",") if part.strip())
        if not classes:
            raise ValueError(f"{name}: {text!r} lists no class; use IN/OUT[@WEIGHT],..., e.g. 8192/32,256/1024")
        return classes

    @classmethod
    def _parse_one(cls, text: str, name: str) -> RequestClass:
        lengths, _, weight_text = text.partition("@")
        input_text, slash, output_text = lengths.partition("/")
        if not slash:
            raise ValueError(f"{name}: {text!r} is not IN/OUT; e.g. 8192/32 (prompt tokens / output tokens)")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"{name}: {text!r} has a weight that is not a number; e.g. 8192/32@3") from None
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"{name}: {text!r} needs a positive weight")
        prompt = LengthRange.parse(input_text, f"{name} (prompt)")
        return cls(prompt, LengthRange.parse(output_text, f"{name} (output)"), weight)

    def __str__(self) -> str:
        return f"{self.input_len}/{self.output_len}@{self.weight:g}"


@dataclass(frozen=True)
class Vocabulary:
    """The token ids a random prompt may use, and the tokenizer when text prompts are wanted."""

    size: int
    special_ids: frozenset[int] = frozenset()
    tokenizer: Tokenizer | None = field(default=None, compare=False)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> Vocabulary:
        special = {i for i in (tokenizer.bos_token_id, *tokenizer.eos_token_ids) if i is not None}
        return cls(tokenizer.vocab_size, frozenset(special), tokenizer)

    def allowed_ids(self) -> np.ndarray:
        ids = np.arange(self.size, dtype=np.int64)
        return ids[~np.isin(ids, list(self.special_ids))] if self.special_ids else ids

    def random_ids(self, rng: np.random.Generator, n: int, allowed: np.ndarray | None = None) -> tuple[int, ...]:
        allowed = self.allowed_ids() if allowed is None else allowed
        return tuple(int(t) for t in allowed[rng.integers(0, len(allowed), size=n)])


@dataclass(frozen=True)
class SyntheticWorkload:
    """`num_requests` prompts of `input_len` tokens asking for `output_len` tokens each.

    With `prefix_len`, every prompt starts with one of `prefix_groups` shared prefixes of that
    many tokens (request i takes prefix i mod groups) before its own `input_len` tokens: the
    shared-system-prompt workload that prefix caching and prefix-aware routing are for.

    With a `mix`, `input_len` and `output_len` are ignored: each request draws one of the mix's
    classes (by weight), then its lengths from that class.
    """

    num_requests: int
    input_len: LengthRange
    output_len: LengthRange
    prompt_kind: PromptKind = PromptKind.TOKENS
    prefix_len: int = 0
    prefix_groups: int = 1
    mix: tuple[RequestClass, ...] = ()

    def build(self, vocab: Vocabulary, seed: int) -> list[BenchRequest]:
        rng = np.random.default_rng(seed)
        inputs, outputs = self._lengths(rng)
        allowed = vocab.allowed_ids()
        prefixes = [vocab.random_ids(rng, self.prefix_len, allowed) for _ in range(self.prefix_groups)]
        requests = []
        for i, (n_in, n_out) in enumerate(zip(inputs, outputs, strict=True)):
            ids = prefixes[i % self.prefix_groups] + vocab.random_ids(rng, n_in, allowed)
            prompt: tuple[int, ...] | str = ids
            if self.prompt_kind is PromptKind.TEXT:
                prompt = text_prompt(vocab, ids, len(ids))
            requests.append(BenchRequest(i, prompt, len(ids), n_out))
        return requests

    def _lengths(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        n = self.num_requests
        if not self.mix:
            return self.input_len.draw(rng, n), self.output_len.draw(rng, n)
        weights = np.array([c.weight for c in self.mix])
        picks = rng.choice(len(self.mix), size=n, p=weights / weights.sum())
        inputs = [self.mix[k].input_len.draw(rng, 1)[0] for k in picks]
        outputs = [self.mix[k].output_len.draw(rng, 1)[0] for k in picks]
        return inputs, outputs


def text_prompt(vocab: Vocabulary, ids: Sequence[int], length: int) -> str:
    """Text of about `length` tokens made from `ids`: decode, re-encode, cut, decode again (a
    decoded string rarely re-encodes to the same ids, so one round of cutting is needed)."""
    if vocab.tokenizer is None:
        raise ValueError("--prompt-kind: text prompts need a tokenizer; pass --tokenizer MODEL or use tokens")
    tok = vocab.tokenizer
    text = tok.decode(list(ids))
    return tok.decode(tok.encode(text)[:length])
