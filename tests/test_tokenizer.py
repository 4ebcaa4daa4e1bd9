"""Tokenizer and chat-template parity with Hugging Face transformers on the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minicpm.tokenizer import CHATML_TEMPLATE, IncrementalDecoder, Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "山东省最高的山是哪座山, 它比黄山高还是矮？差距多少？",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "  two  spaces,   three,\tand a tab",
    "\n\nnewlines\n\n\n and trailing   ",
    "   ",
    "",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "inline <s> and </s> markers",
    "digits 1234567890 3.14159 and ünïcödé ⅶ",
    "<|im_end|><|im_end|>x",
]


@pytest.fixture(params=["sentencepiece", "default-bpe"])
def tokenizer_dir(request, spm_dir: Path, default_model_dir: Path) -> Path:
    return spm_dir if request.param == "sentencepiece" else default_model_dir


def test_encode_decode_match_transformers(tokenizer_dir: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ours = Tokenizer.from_pretrained(tokenizer_dir)
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_special_tokens_are_split_out(spm_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(spm_dir)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 32001 and ids[-1] == 32000
    assert tok.encode("x")[0] == 1  # bos, as tokenizer_config says


def test_incremental_decoding_never_breaks_utf8(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        decoder = IncrementalDecoder(tok)
        deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(deltas) == tok.decode(ids), text
        assert not any("\ufffd" in d for d in deltas), (text, deltas)


def test_byte_fallback_pieces_are_held_until_complete(spm_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(spm_dir)
    ids = tok.encode("a🦙", add_special_tokens=False)
    assert len(ids) == 5  # ▁a + four <0xNN> byte pieces
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert deltas == ["a", "", "", "", "🦙"]


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    [
        {"role": "user", "content": "山东省最高的山是哪座山?"},
        {"role": "assistant", "content": "泰山。"},
        {"role": "user", "content": "它比黄山高还是矮?"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tmp_path: Path, default_model_dir: Path, spm_dir: Path, add_generation_prompt: bool
) -> None:
    chatml_dir = tmp_path / "chatml"
    shutil.copytree(spm_dir, chatml_dir)
    config = json.loads((chatml_dir / "tokenizer_config.json").read_text())
    (chatml_dir / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML_TEMPLATE}))
    for directory in (default_model_dir, chatml_dir):  # SmolLM2's own template (default system) and ChatML
        hf = transformers.AutoTokenizer.from_pretrained(directory)
        ours = Tokenizer.from_pretrained(directory)
        for messages in CONVERSATIONS:
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_default_chat_formats(spm_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(spm_dir)  # no chat_template, but <|im_start|> in the vocabulary
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": "be brief"}, *messages]
    assert tok.apply_chat_template(with_system) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, chat_format="minicpm") == "<用户>hi<AI>"
    with pytest.raises(TokenizerError, match="unknown chat format"):
        tok.apply_chat_template(messages, chat_format="vicuna")
    with pytest.raises(TokenizerError, match="message 0"):
        tok.apply_chat_template([{"content": "no role"}])


def test_template_errors_are_clear(tmp_path: Path, spm_dir: Path) -> None:
    shutil.copytree(spm_dir, tmp_path / "t")
    config = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    bad = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": bad}))
    tok = Tokenizer.from_pretrained(tmp_path / "t")
    with pytest.raises(TokenizerError, match="first message must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_pretrained(tmp_path)
