"""Token ids -> streamed text deltas, and stop strings cut out of that stream.

IncrementalDetokenizer turns one generated token at a time into the text it adds. A character
split over several byte tokens (an emoji, CJK) decodes to U+FFFD until its last byte arrives, so
a delta is held back while the decoded tail ends in U+FFFD; the deltas concatenated equal the
full decode of the output. Each step decodes a short window (vLLM's prefix/read offsets), not the
whole sequence, so a step costs the same at token 10 and token 10,000.

StopChecker watches the deltas for stop strings. Text that could still be the start of a stop
string is held back, so a stop string split over several tokens is cut exactly; `flush()` gives
the held text back when generation ends for another reason.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# A UTF-8 character has at most 4 bytes, so once this many tokens are pending the U+FFFD is in
# the output for good (invalid bytes), not a character waiting for its last byte.
_MAX_PENDING_TOKENS = 4
# Tokens of context decoded before the first output token: decoders such as SentencePiece's drop
# the leading space of a sequence's first token, which must not happen mid-text.
_PROMPT_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0  # start of the decode window: context for the text already emitted
        self._read_offset = len(self._ids)  # tokens before this are emitted

    def step(self, token_id: int) -> str:
        """The text `token_id` completes; "" while it ends inside a multi-byte character."""
        self._ids.append(token_id)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        pending = len(self._ids) - self._read_offset
        if len(text) <= len(prefix) or (text.endswith(_REPLACEMENT) and pending < _MAX_PENDING_TOKENS):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Text still held back at the end of generation (bytes that never became a character)."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix):]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)


class StopChecker:
    def __init__(self, stop_strings: Sequence[str], include_stop: bool = False) -> None:
        self._stops = tuple(s for s in stop_strings if s)
        self._include = include_stop
        self._held = ""
        self._stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string matched). After a match, feeds return ("", True)."""
        if self._stopped:
            return "", True
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            self._stopped, self._held = True, ""
            start, stop = match
            self.matched = stop
            return text[: start + len(stop) if self._include else start], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held text, released when generation ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """The stop string a reader of `text`, character by character, sees complete first."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
