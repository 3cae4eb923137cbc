"""Streaming text: deltas never split a character, and stop strings are cut where they begin."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.tokenizer import Tokenizer
from engine.weights.default_model import DEFAULT_MODEL

TEXTS = ["plain ascii", "emoji 👋🏽 and 🧑‍💻!", "中文字符和日本語のかな", "mixé: 🦀€ß→✓ 한국어", "🇫🇷🇩🇪"]


class ByteTokenizer:
    """One token per UTF-8 byte, so every multi-byte character is split over several tokens."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream(tokenizer, prompt: list[int], output: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    return [detok.step(t) for t in output] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_split_characters_are_emitted_whole(text):
    tok = ByteTokenizer()
    deltas = stream(tok, tok.encode("prompt: é"), tok.encode(text))
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text
    emitted = [d for d in deltas if d]
    assert len(emitted) == len(text)  # one delta per character, on the token that completes it


def test_invalid_bytes_are_not_held_forever():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.step(0x80) for _ in range(5)]  # lone continuation bytes never become a character
    assert deltas[:4] == ["", "", "", "\ufffd" * 4]  # released once no character can still complete
    assert "".join(deltas) + detok.flush() == tok.decode([0x80] * 5)


def test_generation_ending_mid_character_is_flushed():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.step(t) for t in "ok👋".encode()[:-1]] == ["o", "k", "", "", ""]  # 3 of 4 bytes
    assert detok.flush() == "\ufffd"


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_model(DEFAULT_MODEL)


@pytest.mark.parametrize("text", TEXTS)
def test_real_byte_level_tokens_stream_to_the_full_decode(smollm2, text):
    prompt = smollm2.encode("<|im_start|>assistant\n")
    output = smollm2.encode(text + "<|im_end|>")
    pieces = [smollm2.decode([t]) for t in output]
    assert any("\ufffd" in p for p in pieces) or text.isascii()  # the split really happens

    deltas = stream(smollm2, prompt, output)

    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == smollm2.decode(output) == text  # <|im_end|> is skipped as special


# --- stop strings -------------------------------------------------------------------------------


def feed_all(checker: StopChecker, deltas: Sequence[str]) -> tuple[str, bool, list[str]]:
    out, emitted = [], []
    for d in deltas:
        text, matched = checker.feed(d)
        emitted.append(text)
        out.append(text)
        if matched:
            return "".join(out), True, emitted
    tail = checker.flush()
    return "".join(out) + tail, False, emitted + [tail]


def test_stop_string_inside_one_delta_is_cut_at_its_start():
    assert feed_all(StopChecker(["###"]), ["Hello", " world### tail"])[:2] == ("Hello world", True)


def test_stop_string_across_tokens_is_cut_exactly_and_prefix_held_back():
    checker = StopChecker(["</end>"])
    assert checker.feed("answer <") == ("answer ", False)  # "<" may start the stop string
    assert checker.feed("/e") == ("", False)
    assert checker.feed("nd> and more") == ("", True)
    assert checker.stopped and checker.feed("x") == ("", True)


def test_held_text_that_turns_out_not_to_be_a_stop_is_released():
    checker = StopChecker(["STOP"])
    assert checker.feed("a ST") == ("a ", False)
    assert checker.feed("ALL") == ("STALL", False)
    assert checker.feed("ok ST") == ("ok ", False)
    assert checker.flush() == "ST"  # generation ended (max_tokens, eos): nothing is lost


def test_include_stop_keeps_the_stop_string():
    text, matched, _ = feed_all(StopChecker(["\n\n"], include_stop=True), ["one\n", "\ntwo"])
    assert (text, matched) == ("one\n\n", True)


def test_the_stop_string_that_completes_first_wins():
    # "cd" ends at index 4, before "bcde" (index 5), although "bcde" starts earlier.
    assert feed_all(StopChecker(["bcde", "cd"]), ["abcdef"])[:2] == ("ab", True)
    # Same end: the longer (earlier-starting) one cuts more.
    assert feed_all(StopChecker(["b", "ab"]), ["xab"])[:2] == ("x", True)


def test_stop_strings_over_real_tokens_with_the_detokenizer(smollm2):
    output = smollm2.encode("The answer is 42.\nUser: next question")
    detok = IncrementalDetokenizer(smollm2, [])
    checker = StopChecker(["\nUser:"])
    emitted, matched = [], False
    for t in output:
        text, matched = checker.feed(detok.step(t))
        emitted.append(text)
        if matched:
            break
    assert matched and "".join(emitted) == "The answer is 42."
