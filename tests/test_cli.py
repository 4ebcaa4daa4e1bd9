"""The command line on the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicpm import LLM, default_model
from minicpm.cli import main


def test_chat_answers_paris(default_model_dir: Path, capsys) -> None:
    assert main(["chat", "--prompt", "What is the capital of France?", "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_streams_a_completion(default_model_dir: Path, capsys) -> None:
    prompt = "The capital of France is"
    args = ["generate", "--model", str(default_model_dir), "--prompt", prompt, "--max-new-tokens", "8", "--ignore-eos"]
    assert main(args) == 0
    expected = LLM.from_pretrained(default_model_dir).generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert len(expected.token_ids) == 8
    assert capsys.readouterr().out == expected.text + "\n"


def test_interactive_chat_reset_and_exit(default_model_dir: Path, capsys, monkeypatch) -> None:
    answers = iter(["What is the capital of France?", "/reset", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    assert main(["chat", "--temperature", "0", "--max-new-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "history cleared" in captured.err


def test_missing_default_model_names_the_install_command(monkeypatch, capsys) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    assert main(["chat", "--prompt", "hi"]) == 2
    assert default_model.INSTALL_COMMAND in capsys.readouterr().err


def test_bad_model_directory_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate"]) == 2  # --prompt is required
