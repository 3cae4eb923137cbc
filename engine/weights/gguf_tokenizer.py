"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: it stores the vocabulary (`tokenizer.ggml.tokens`), the BPE
merges, a type per token (3 = control, 4 = user-defined) and the name of the pre-tokenizer
(`tokenizer.ggml.pre`) whose split regex llama.cpp hard-codes. Only byte-level BPE vocabularies
(`tokenizer.ggml.model` "gpt2": Llama 3, Qwen2, SmolLM2) are rebuilt; SentencePiece ones are
refused with the way out.

The result is built to encode exactly as transformers' GGUF tokenizer does (the correctness
oracle is transformers on the same file): the same vocabulary re-spelling, merges, added tokens
and split regex per pre-tokenizer name. Two consequences, both deliberate: for "smollm" the split
is GPT-2's, without llama.cpp's (and SmolLM2's tokenizer.json's) separate digit split, which only
matters for a non-ASCII numeral right after a space (" ²"); and Llama 3's `ignore_merges` is off.
Pre-tokenizer names outside the table are refused rather than guessed (transformers would
silently fall back to GPT-2's split).

Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from engine.errors import ModelLoadError, UnsupportedModel

_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's pre-tokenizer names (of llama- and qwen2-architecture files) -> the split regex
# transformers applies before byte-level BPE; GPT-2's own split for the names in _GPT2_SPLIT.
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_GPT2_SPLIT = ("gpt-2", "smollm")


@dataclass(frozen=True)
class GGUFTokenizer:
    backend: Backend
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    special_tokens: dict[str, str]  # "bos_token" -> "<|im_start|>", ... (chat template variables)


def build(path: str, metadata: Mapping[str, Any]) -> GGUFTokenizer:
    """The tokenizer `metadata` (gguf_metadata.read_metadata of the file at `path`) describes."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModel(path, f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is rebuilt",
                               "use the model's HF directory (with tokenizer.json) instead of the GGUF file")
    tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(path, "metadata key tokenizer.ggml.tokens is missing",
                             "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    alphabet = _byte_alphabet()
    vocab = {_respell(t, alphabet): i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(path, metadata.get("tokenizer.ggml.pre", "gpt-2"))
    backend.decoder = decoders.ByteLevel()
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them would
    # grow the vocabulary past the model's (transformers skips them too).
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types, strict=True) if k == _CONTROL and set(t) <= alphabet])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED and t in vocab])

    ids = {k: metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom", "unknown", "padding")}
    names = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}  # template variable -> GGUF key
    special = {f"{n}_token": tokens[i] for n, k in names.items() if (i := ids[k]) is not None}
    _add_bos_eos(backend, special, ids, metadata.get("tokenizer.ggml.add_bos_token", False),
                 metadata.get("tokenizer.ggml.add_eos_token", False))
    return GGUFTokenizer(
        backend=backend,
        bos_token_id=ids["bos"],
        eos_token_ids=tuple(dict.fromkeys(i for k in ("eos", "eot", "eom") if (i := ids[k]) is not None)),
        chat_template=metadata.get("tokenizer.chat_template"),
        special_tokens=special,
    )


def _pre_tokenizer(path: str, pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in _GPT2_SPLIT:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise UnsupportedModel(path, f"tokenizer.ggml.pre is {pre!r}, a split rule the engine does not know",
                           "use the model's HF directory (with tokenizer.json) instead of the GGUF file")


def _add_bos_eos(backend: Backend, special: dict[str, str], ids: dict[str, int | None],
                 add_bos: bool, add_eos: bool) -> None:
    """What encode(add_special_tokens=True) adds, as llama.cpp's add_bos/add_eos flags say."""
    single, pair, marks = ["$A:0"], ["$A:0", "$B:1"], []
    if add_bos and ids["bos"] is not None:
        single, pair = [f"{special['bos_token']}:0", *single], [f"{special['bos_token']}:0", *pair]
        marks.append((special["bos_token"], ids["bos"]))
    if add_eos and ids["eos"] is not None:
        single, pair = [*single, f"{special['eos_token']}:0"], [*pair, f"{special['eos_token']}:1"]
        marks.append((special["eos_token"], ids["eos"]))
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=marks)


@cache
def _byte_alphabet() -> frozenset[str]:
    return frozenset(_bytes_to_unicode().values())


def _respell(token: str, alphabet: frozenset[str]) -> str:
    """A token written in plain text (some converters do) -> its byte-level spelling."""
    if set(token) <= alphabet:
        return token
    table = _bytes_to_unicode()
    return "".join(table[b] for b in token.encode("utf-8"))


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table
