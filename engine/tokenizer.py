"""Text <-> token ids, and chat messages -> prompt text, for one model.

Wraps a `tokenizers.Tokenizer` loaded from a HF directory's tokenizer.json or rebuilt from a
GGUF file's metadata (engine/weights/gguf_tokenizer.py), plus what generation needs from the
model's files: the BOS id, the end-of-sequence ids and the chat template. Chat templates are
rendered as transformers renders them (sandboxed jinja2, trim_blocks, lstrip_blocks, its
`tojson`, `raise_exception` and `strftime_now`), so a prompt built here is the prompt the model
was trained on.

Must not import torch: the scheduler service tokenizes without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend

from engine.errors import InvalidRequest, ModelLoadError
from engine.weights.checks import library_errors
from engine.weights.default_model import resolve_model_path

_PLAIN_PROMPT = "send a plain prompt (text or token ids) instead of chat messages"
_MESSAGE_KEYS = ("role", "content")


class Tokenizer:
    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
        special_tokens: Mapping[str, str],
    ) -> None:
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(eos_token_ids)
        self._chat_template = chat_template
        self._special_tokens = dict(special_tokens)  # bos_token, eos_token, ... for the chat template

    @classmethod
    def from_model(cls, name_or_path: str | Path) -> Tokenizer:
        """The tokenizer of a model name or path (HF directory or GGUF file), without its weights."""
        path = resolve_model_path(name_or_path)
        if path.is_dir():
            return cls.from_hf_dir(path)
        if not path.exists():
            raise ModelLoadError(str(path), "no such file or directory",
                                 "pass a HF model directory, a .gguf file, or 'smollm2'")
        return cls.from_gguf(path)

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        from engine.weights.hf import read_json, read_special_ids

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(str(path), "tokenizer.json is missing",
                                 "write it with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
        with library_errors(path, "loading tokenizer.json", "restore it from the model's repository"):
            backend = Backend.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.exists() else {}
        special = {k: text for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (text := _token_text(config.get(k))) is not None}
        bos, eos = read_special_ids(directory)
        if bos is None and "bos_token" in special:
            bos = backend.token_to_id(special["bos_token"])
        if not eos and "eos_token" in special and (eos_id := backend.token_to_id(special["eos_token"])) is not None:
            eos = (eos_id,)
        return cls(backend, bos_token_id=bos, eos_token_ids=eos, chat_template=_hf_chat_template(directory, config),
                   special_tokens=special)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """From a GGUF file's metadata alone: the tensors are not read."""
        from engine.weights.gguf_metadata import read_metadata
        from engine.weights.gguf_tokenizer import build

        metadata = read_metadata(path)
        with library_errors(path, "building the tokenizer from GGUF metadata",
                            "re-download the file, or re-convert it with llama.cpp's convert_hf_to_gguf.py"):
            built = build(str(path), metadata)
        return cls(built.backend, bos_token_id=built.bos_token_id, eos_token_ids=built.eos_token_ids,
                   chat_template=built.chat_template, special_tokens=built.special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special tokens written in the text ("<|im_start|>") become their ids, as in transformers.

        Through encode_batch, which releases the GIL while it works (encode holds it): a long text
        tokenized on a thread then leaves the caller's event loop running."""
        return list(self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, rendered by the model's own template."""
        if self._chat_template is None:
            raise InvalidRequest("messages", "this model ships no chat template", _PLAIN_PROMPT)
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not all(isinstance(message.get(k), str) for k in _MESSAGE_KEYS):
                raise InvalidRequest("messages", f"message {i} lacks a string 'role' or 'content'",
                                     "give every message a role and a text content")
        try:
            return _compile(self._chat_template).render(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as e:
            fix = "follow the model's conversation format (roles, their order), or " + _PLAIN_PROMPT
            raise InvalidRequest("messages", f"the model's chat template refused them: {e}", fix) from e


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja (newer exports) wins over tokenizer_config.json's "chat_template"."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' version: jinja's own escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidRequest("messages", f"the model's chat template does not compile: {e}", _PLAIN_PROMPT) from e
