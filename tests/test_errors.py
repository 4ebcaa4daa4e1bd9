"""Failures do not hide: a user's bad input is a UserError naming it, while a bug raised where a
bad file is expected propagates as itself, and an error that ends one request is counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import SamplingParams
from minicpm.config import ConfigError
from minicpm.convert import ConversionError
from minicpm.engine import EngineConfig, LLMEngine
from minicpm.errors import UserError
from minicpm.quant import UnmappableQuantizationError
from minicpm.tokenizer import Tokenizer, TokenizerError
from minicpm.weights import CheckpointError, open_checkpoint


def test_the_file_and_setting_errors_are_user_errors_and_value_errors() -> None:
    for cls in (ConfigError, CheckpointError, TokenizerError, ConversionError, UnmappableQuantizationError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    with pytest.raises(UserError, match="sampling parameter 'top_p'"):
        SamplingParams(top_p=0)


def test_a_bug_inside_the_tokenizer_json_reader_is_not_a_bad_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="cannot read"):  # tokenizers' own error: the file is bad
        Tokenizer.from_pretrained(tmp_path)

    from tokenizers import Tokenizer as HFTokenizer

    def broken(path: str):
        raise KeyError("a bug, not a bad file")

    monkeypatch.setattr(HFTokenizer, "from_file", broken)
    with pytest.raises(KeyError, match="a bug"):
        Tokenizer.from_pretrained(tmp_path)


def test_a_torch_checkpoint_error_that_is_not_about_the_file_propagates(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m"
    random_model(tiny_config()).save_pretrained(path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable weights-only PyTorch checkpoint"):
        open_checkpoint(path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("a bug or a full machine, not a bad file")

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(MemoryError):
        open_checkpoint(path)


def test_a_template_bug_propagates_and_a_template_that_fails_on_the_messages_is_named(spm_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(spm_dir)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="chat template failed on these messages: TypeError"):
        tokenizer.apply_chat_template(messages, template="{{ messages[0].content / 2 }}")
    with pytest.raises(TokenizerError, match="chat template failed on these messages: UndefinedError"):
        tokenizer.apply_chat_template(messages, template="{{ nowhere.at_all }}")


def test_a_request_ended_by_an_error_is_logged_and_counted(caplog) -> None:
    config = tiny_config(num_hidden_layers=2)
    model = random_model(config)
    kv = config.kv_bytes_per_token(4) * 8 * 40
    engine = LLMEngine(model, None, EngineConfig(block_size=8, max_num_seqs=4, kv_cache_memory=kv))
    on_token = engine._on_token

    def failing(request, sampled):
        if request.seq.token_ids[:3] == [6, 7, 8]:
            raise RuntimeError("detokenizer failed")
        return on_token(request, sampled)

    engine._on_token = failing
    assert engine.stats()["request_errors"] == 0
    with caplog.at_level("ERROR", logger="minicpm.engine"):
        got = engine.generate([[1, 2, 3], [6, 7, 8]], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert [c.finish_reason for c in got] == ["length", "error"]
    assert engine.stats()["request_errors"] == 1
    (record,) = [r for r in caplog.records if "failed while finishing its token" in r.getMessage()]
    assert record.exc_info is not None and "detokenizer failed" in str(record.exc_info[1])


def test_a_gguf_reader_bug_is_not_a_bad_file(tmp_path: Path, monkeypatch) -> None:
    from minicpm.convert import convert_gguf

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" * 10)
    with pytest.raises(ConversionError, match="is not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    import gguf

    def broken(path: str):
        raise AttributeError("a bug in the reader")

    monkeypatch.setattr(gguf, "GGUFReader", broken)
    with pytest.raises(AttributeError, match="a bug"):
        convert_gguf(bad, tmp_path / "out2")
