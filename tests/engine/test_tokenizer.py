"""The tokenizer: the same ids and prompts as transformers, for the GGUF and for a HF directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import InvalidRequest, ModelLoadError, UnsupportedModel
from engine.tokenizer import Tokenizer
from engine.weights.default_model import DEFAULT_MODEL
from tests.engine._tiny_models import save_hf_model, smollm2_transformers_tokenizer, write_gguf

CORPUS = [
    "Hello world",
    " leading space, and trailing space ",
    "multiple    spaces\tand\ttabs\n\n\nand newlines\r\nwindows",
    "Numbers: 0 7 42 1234567890 3.14159 -12,345.67 1e-9 ²³¹ ٣٤ 一二三",
    "Contractions: I'm you're we'll they'd it's DON'T 'S",
    "Unicode: naïve café Zürich résumé Ελληνικά русский текст עברית العربية",
    "CJK: 你好，世界！日本語のテキスト한국어 텍스트",
    "Emoji: 👋🏽 🧑‍💻 🇫🇷 ❤️ 🦀🐍",
    "Combining: e\u0301 a\u0308 \u200b zero-width\u200dj",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}  # comment\n",
    "if (a && b || !c) { printf(\"%d\\n\", a->b[0]); }",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> and <|im_end|>",
    "",
    " ",
    "\n",
    "a" * 300,
    "URL https://example.com/path?q=1&r=2#frag and email me@example.org",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the 🐔 cross the road?"},
        {"role": "user", "content": "Why?\n\n  To get to the other side?"},
    ],
]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference():
    return smollm2_transformers_tokenizer()


def test_gguf_tokenizer_encodes_like_transformers(smollm2, reference):
    for text in CORPUS:
        assert smollm2.encode(text) == reference.encode(text, add_special_tokens=False), text
        assert smollm2.encode(text, add_special_tokens=True) == reference.encode(text), text


def test_gguf_tokenizer_decodes_like_transformers(smollm2, reference):
    for text in CORPUS:
        ids = reference.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert smollm2.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert smollm2.decode(smollm2.encode(CORPUS[6])) == CORPUS[6]


def test_gguf_special_ids_and_vocab(smollm2, reference):
    assert smollm2.vocab_size == len(reference) == 49152
    assert smollm2.bos_token_id == reference.bos_token_id == 1
    assert smollm2.eos_token_ids == (reference.eos_token_id,) == (2,)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(smollm2, reference, add_generation_prompt):
    for chat in CHATS:
        want = reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert smollm2.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == want


def test_hf_directory_tokenizer_matches_the_gguf_one(tmp_path, smollm2, reference):
    reference.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    hf = Tokenizer.from_hf_dir(tmp_path)
    for text in CORPUS:
        assert hf.encode(text) == smollm2.encode(text)
    assert (hf.bos_token_id, hf.eos_token_ids, hf.vocab_size) == (1, (2,), 49152)
    assert hf.apply_chat_template(CHATS[2]) == smollm2.apply_chat_template(CHATS[2])

    # Without chat_template.jinja the template is read from tokenizer_config.json.
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template(CHATS[0]) == "[user] What is 2+2?<|im_end|>"


def test_checkpoint_tokenizer_of_a_model_directory(tmp_path, reference):
    from engine.weights import load_checkpoint

    save_hf_model(tmp_path)
    reference.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_checkpoint(tmp_path).tokenizer()
    assert tok.eos_token_ids == (2, 0) and tok.encode("hi") == reference.encode("hi", add_special_tokens=False)


def test_template_features_transformers_provides(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    template = (
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ m | tojson }}{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}"
        "{% generation %}{{ bos_token }}{% endgeneration %}"
    )
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = Tokenizer.from_hf_dir(tmp_path)
    chat = [{"role": "user", "content": "<é>"}, {"role": "user", "content": "second"}]
    assert tok.apply_chat_template(chat) == '{"role": "user", "content": "<é>"}<|im_start|>'
    with pytest.raises(InvalidRequest, match="no bad roles") as e:
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    assert e.value.field == "messages"


def test_chat_requests_without_a_usable_template_are_invalid(tmp_path, reference, smollm2):
    reference.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(InvalidRequest, match="no chat template") as e:
        Tokenizer.from_hf_dir(tmp_path).apply_chat_template(CHATS[0])
    assert e.value.field == "messages" and "plain prompt" in e.value.fix

    with pytest.raises(InvalidRequest, match="message 1"):
        smollm2.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}])

    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(InvalidRequest, match="does not compile"):
        Tokenizer.from_hf_dir(tmp_path).apply_chat_template(CHATS[0])


def test_missing_or_unsupported_tokenizers_raise_typed_errors(tmp_path):
    save_hf_model(tmp_path / "hf")
    with pytest.raises(ModelLoadError, match="tokenizer.json is missing"):
        Tokenizer.from_model(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="loading tokenizer.json"):
        Tokenizer.from_model(tmp_path / "hf")

    state = {"model.embed_tokens.weight": torch.zeros(256, 64)}
    write_gguf(tmp_path / "spm.gguf", state, tokenizer_model="llama")
    with pytest.raises(UnsupportedModel, match="tokenizer.ggml.model is 'llama'"):
        Tokenizer.from_gguf(tmp_path / "spm.gguf")
    with pytest.raises(ModelLoadError, match="no such file"):
        Tokenizer.from_model(tmp_path / "absent.gguf")


def test_tokenizer_loads_without_torch():
    code = (
        "import sys\n"
        "from engine.tokenizer import Tokenizer\n"
        "from engine.detokenizer import IncrementalDetokenizer\n"
        "t = Tokenizer.from_model('smollm2')\n"
        "assert t.decode(t.encode('ok')) == 'ok'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=60)
