"""What a caller may ask of one generation, and the rules that check it.

The rules live here, torch-free, so every door refuses bad input with the same words (the field,
what is wrong, the fix): the scheduler at the mesh's front door, and the engine for in-process
callers. Workers behind the scheduler convert what it sends and check nothing again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import InvalidRequest

# A positive temperature below this samples at it: dividing logits by a temperature near 0 overflows
# float32 (inf, then NaN probabilities), and anything under about 0.01 already picks the argmax
# but for near-ties. vLLM raises such temperatures to the same floor; 0 itself stays greedy.
MIN_TEMPERATURE = 0.01
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy; a positive value below MIN_TEMPERATURE samples at it
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    # Stop strings are cut from the returned text; set to keep them.
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def sampling_temperature(self) -> float:
        """What a sampled (not greedy) row divides its logits by: the temperature, at least
        MIN_TEMPERATURE."""
        return max(self.temperature, MIN_TEMPERATURE)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequest naming the first bad field."""
        # NaN passes every comparison below unnoticed (NaN < 0 is false) and an infinity turns the
        # logits into NaN: a token 0 forever, so every float is checked for both first.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidRequest(name, f"is {value}", "use a finite number")
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"is {self.max_tokens}", "ask for at least 1 token")
        if self.temperature < 0:
            raise InvalidRequest("temperature", f"is {self.temperature}", "use 0 (greedy) or a positive value")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p", f"is {self.top_p}", "use a value in (0, 1]; 1 disables it")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"is {self.top_k}", "use 0 (off) or a positive count")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("min_p", f"is {self.min_p}", "use a value in [0, 1]; 0 disables it")
        if self.repetition_penalty <= 0:
            raise InvalidRequest(
                "repetition_penalty", f"is {self.repetition_penalty}", "use a positive value; 1 disables it"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                "stop", f"has {len(self.stop)} strings", f"pass at most {MAX_STOP_STRINGS} stop strings"
            )
        for s in self.stop:
            if not s:
                raise InvalidRequest("stop", "contains an empty string", "remove empty stop strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequest(
                    "stop", f"has a string of {len(s)} characters", f"keep each under {MAX_STOP_STRING_CHARS}"
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                "stop_token_ids", f"has {len(self.stop_token_ids)} ids", f"pass at most {MAX_STOP_TOKEN_IDS}"
            )
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise InvalidRequest(
                        "stop_token_ids", f"contains {t}", f"use token ids in [0, {vocab_size})"
                    )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", f"is {self.seed}", "use a non-negative 63-bit integer")


def check_context(num_tokens: int, max_tokens: int, max_model_len: int, num_output_tokens: int = 0) -> None:
    """Refuse a request that cannot fit the model's context. num_tokens counts the prompt plus the
    num_output_tokens some worker already generated; max_tokens counts those outputs too."""
    if num_tokens >= max_model_len:
        raise InvalidRequest(
            "prompt", f"has {num_tokens} tokens, the context length is {max_model_len}", "shorten the prompt"
        )
    if num_tokens - num_output_tokens + max_tokens > max_model_len:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({num_tokens - num_output_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context "
            f"length {max_model_len}",
            f"ask for at most {max_model_len - num_tokens + num_output_tokens} tokens or shorten the prompt",
        )
