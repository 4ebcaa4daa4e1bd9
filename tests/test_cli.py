"""The command line on the embedded default model (SmolLM2-135M-Instruct): answers, and every bad
input as one ``minicpm: error:`` line that names it, found before any model is loaded."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import random_model, tiny_config

from minicpm import LLM, default_model
from minicpm.cli import main
from minicpm.convert import convert_checkpoint
from minicpm.engine import EngineConfig


def test_chat_answers_paris(default_model_dir: Path, capsys) -> None:
    assert main(["chat", "--prompt", "What is the capital of France?", "--temperature", "0"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_streams_a_completion(default_model_dir: Path, capsys) -> None:
    prompt = "The capital of France is"
    args = ["generate", "--model", str(default_model_dir), "--prompt", prompt, "--max-new-tokens", "8", "--ignore-eos"]
    assert main(args) == 0
    expected = LLM.from_pretrained(default_model_dir).generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert len(expected.token_ids) == 8
    captured = capsys.readouterr()
    assert captured.out == expected.text + "\n"
    assert captured.err == "(the answer was cut at --max-new-tokens 8)\n"


def test_interactive_chat_reset_and_exit(default_model_dir: Path, capsys, monkeypatch) -> None:
    answers = iter(["What is the capital of France?", "/history", "/reset", "/history", "/nonsense", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    monkeypatch.setenv("MINICPM_CACHE", str(default_model_dir.parent))
    assert main(["chat", "--temperature", "0", "--max-new-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "[user] What is the capital of France?" in captured.out
    assert "(2 messages)" in captured.err and "history cleared" in captured.err and "(0 messages)" in captured.err
    assert "unknown command /nonsense" in captured.err


def test_an_answer_cut_by_the_context_says_so(default_model_dir: Path, capsys) -> None:
    # a KV cache of two 64-token blocks: the context is 128 tokens
    per_token = 2 * 30 * 3 * 64 * 4  # SmolLM2: layers x kv heads x head dim, k and v, float32
    gib = 2.5 * 64 * per_token / 2**30
    args = ["chat", "--prompt", "Tell me a very long story.", "--temperature", "0", "--kv-cache-gib", f"{gib:.9f}"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "tokens: prompt and answer filled the 128 tokens the KV cache holds (--kv-cache-gib)" in err


def test_quantize_int8_answers_like_float32(default_model_dir: Path, capsys) -> None:
    """--quantize int8 on the embedded model: the same greedy answer to a factual question."""
    answers = []
    for flags in ([], ["--quantize", "int8"]):
        args = ["generate", "--prompt", "The capital of France is", "--temperature", "0", "--max-new-tokens", "4"]
        assert main([*args, *flags]) == 0
        answers.append(capsys.readouterr().out)
    assert "Paris" in answers[1] and answers[0] == answers[1]


def test_missing_default_model_names_the_install_command(monkeypatch, capsys) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    assert main(["chat", "--prompt", "hi"]) == 2
    assert default_model.INSTALL_COMMAND in capsys.readouterr().err


def test_bad_model_paths_are_clear_errors(tmp_path: Path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["generate"]) == 2  # --prompt is required
    assert "the following arguments are required: --prompt" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"minicpm: error: checkpoint directory {tmp_path / 'nowhere'} does not exist\n"
    assert main(["chat", "--model", str(tmp_path / "m.gguf"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"minicpm: error: GGUF file {tmp_path / 'm.gguf'} does not exist\n"
    (tmp_path / "config.json").write_text("{}")
    assert main(["chat", "--model", str(tmp_path / "config.json"), "--prompt", "x"]) == 2
    assert f"is a file; give the checkpoint directory that holds config.json and the weights ({tmp_path})" in (
        capsys.readouterr().err
    )


def _one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minicpm: error: ") and "Traceback" not in err, err
    return lines[0]


SEVENTY_DIGITS = "1" * 70


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--device", "tpu"], "--device: unknown device 'tpu'"),
        (["--kv-cache-gib", "inf"], "--kv-cache-gib: expected a finite number, got 'inf'"),
        (["--kv-cache-gib", "nan"], "--kv-cache-gib: expected a finite number, got 'nan'"),
        (["--kv-cache-gib", "0"], "--kv-cache-gib: must be a number of GiB from 1e-6 to 1e6"),
        (["--kv-cache-gib", "1e300"], "--kv-cache-gib: must be a number of GiB from 1e-6 to 1e6"),
        (["--seed", SEVENTY_DIGITS], "--seed: must be an integer in [0, 2**64)"),
        (["--seed", "-1"], "--seed: must be an integer in [0, 2**64)"),
        (["--temperature", "nan"], "--temperature: expected a finite number"),
        (["--temperature", "-0.5"], "--temperature: must be a number >= 0"),
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k: must be an integer >= 0"),
        (["--repetition-penalty", "1000"], "--repetition-penalty: must be in [0.01, 100]"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be a positive integer"),
        (["--max-new-tokens", "ten"], "--max-new-tokens: expected an integer, got 'ten'"),
        (["--block-size", "48"], "--block-size: must be a power of two"),
        (["--max-num-seqs", "0"], "--max-num-seqs: must be a positive integer"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization: must be in (0, 1]"),
        (["--max-num-seqs", "32", "--max-num-batched-tokens", "8"], "--max-num-batched-tokens (8) must be at least"),
        (["--stop", ""], "--stop: must not be empty"),
        (["--quantize", "int2"], "--quantize: invalid choice: 'int2'"),
        (["--dtype", "float16"], "--dtype: invalid choice: 'float16'"),
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "  \n"], "--prompt is empty"),
    ],
)
def test_bad_flags_are_one_line_before_any_load(flags: list[str], named: str, capsys, monkeypatch) -> None:
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(LLM, "from_pretrained", no_load)
    args = ["chat", "--prompt", "hi", *flags] if "--prompt" not in flags else ["chat", *flags]
    assert main(args) == 2
    assert named in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_only_torch_is_one_line(device: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr(LLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert main(["generate", "--prompt", "x", "--device", device]) == 2
    assert f"--device {device}: no CUDA device is available" in _one_error_line(capsys.readouterr().err)


def test_help_answers(capsys) -> None:
    assert main(["--help"]) == 0
    assert "chat" in capsys.readouterr().out
    assert main(["chat", "--help"]) == 0
    assert "--kv-cache-gib" in capsys.readouterr().out


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny"
    random_model(tiny_config()).save_pretrained(path)
    return path


@pytest.mark.parametrize("cut", ["empty", "100 bytes", "middle", "last 100 bytes"])
def test_truncated_safetensors_names_the_file(tiny_dir: Path, cut: str, capsys) -> None:
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "100 bytes": data[:100], "middle": data[: len(data) // 2]}.get(cut, data[:-100]))
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{weights} is not a readable safetensors file ({len(weights.read_bytes()):,} bytes" in line
    assert "truncated or corrupt" in line


def test_plan_defaults_to_the_embedded_model(default_model_dir: Path, capsys) -> None:
    assert main(["plan", "--context", "4096", "--memory", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["context"] == 4096 and plan["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4


def test_convert_errors_name_what_the_user_gave(tmp_path: Path, capsys, monkeypatch, tiny_dir: Path) -> None:
    assert main(["convert", str(tmp_path / "missing" / "x.gguf"), str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'missing' / 'x.gguf'} does not exist" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "notes.txt").write_text("x")
    assert main(["convert", str(tmp_path / "notes.txt"), str(tmp_path / "out")]) == 2
    assert "is a file but not a .gguf file" in _one_error_line(capsys.readouterr().err)
    assert main(["convert", str(tiny_dir), str(tmp_path / "notes.txt" / "out")]) == 2
    _one_error_line(capsys.readouterr().err)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("minicpm.convert.tempfile.mkdtemp", read_only)
    dst = tmp_path / "ro" / "out"
    assert main(["convert", str(tiny_dir), str(dst)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"minicpm: error: cannot write to {dst.parent} (for {dst}): Permission denied"


def test_conversions_follow_the_umask_and_clear_stale_partials(tmp_path: Path, tiny_dir: Path) -> None:
    dead = tmp_path / ".out.partial-999999999-abc"  # a pid that cannot exist: a killed conversion
    dead.mkdir()
    (dead / "model.safetensors.tmp").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.partial-{os.getpid()}-abc"  # a conversion still running
    live.mkdir()
    old = os.umask(0o022)
    try:
        out = convert_checkpoint(tiny_dir, tmp_path / "out")
    finally:
        os.umask(old)
    assert not dead.exists() and live.exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_a_gguf_model_path_is_converted_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_convert(src, dst, dtype=None):
        calls.append((Path(src), Path(dst)))
        Path(dst).mkdir(parents=True)
        (Path(dst) / "config.json").write_text("{}")
        return Path(dst)

    monkeypatch.setattr("minicpm.convert.convert_gguf", fake_convert)
    monkeypatch.setenv("MINICPM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    first = default_model.resolve_model_path(gguf)
    assert default_model.resolve_model_path(gguf) == first and len(calls) == 1
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("model-")
    gguf.write_bytes(b"GGUF, changed")
    assert default_model.resolve_model_path(gguf) != first and len(calls) == 2


def test_kv_cache_message_counts_usable_tokens_only(default_model_dir: Path) -> None:
    per_token = 2 * 30 * 3 * 64 * 4
    config = EngineConfig(block_size=64, kv_cache_memory=64 * per_token)
    llm = LLM.from_pretrained(default_model_dir, engine_config=config)
    with pytest.raises(ValueError) as info:
        llm.engine.make_request("word " * 100)
    assert f"the KV cache holds 64 tokens ({64 * per_token / 2**20:.2f} MiB at {per_token / 1024:.2f} KiB" in str(
        info.value
    )


def test_review_findings_are_one_line_each(tmp_path: Path, tiny_dir: Path, default_model_dir: Path, capsys) -> None:
    """Inputs a fresh-eyes review found still ending in tracebacks or unclear messages."""
    assert main(["plan", "--context", "100", "--memory", "1e300"]) == 2
    assert "--memory: must be a number of GiB" in _one_error_line(capsys.readouterr().err)
    assert main(["convert", str(tiny_dir), str(tmp_path / "o"), "--max-shard-size", "1e300"]) == 2
    assert "--max-shard-size: must be a number of GiB" in _one_error_line(capsys.readouterr().err)

    bad = tmp_path / "latin1"
    bad.mkdir()
    (bad / "config.json").write_bytes(b"\xff\xfe{}")
    assert main(["generate", "--model", str(bad), "--prompt", "x"]) == 2
    assert f"{bad / 'config.json'} is not UTF-8 text" in _one_error_line(capsys.readouterr().err)

    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps(config | {"vocab_size": 1000}))
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert (
        "does not match its config: " in line and "embed_tokens.weight has shape [97, 64], expected [1000, 64]" in line
    )

    only_gguf = tmp_path / "downloads"
    only_gguf.mkdir()
    (only_gguf / "model.Q4_0.gguf").write_bytes(b"GGUF")
    assert main(["chat", "--model", str(only_gguf), "--prompt", "x"]) == 2
    assert f"give the file, e.g. --model {only_gguf / 'model.Q4_0.gguf'}" in _one_error_line(capsys.readouterr().err)

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text(json.dumps(config))
    (junk / "pytorch_model.bin").write_bytes(b"\x80\x02not a checkpoint at all")
    assert main(["generate", "--model", str(junk), "--prompt", "x"]) == 2
    assert "is not a readable weights-only PyTorch checkpoint, probably truncated or corrupt" in _one_error_line(
        capsys.readouterr().err
    )

    args = ["chat", "--model", str(default_model_dir), "--prompt", "x", "--kv-cache-gib", "1e-6"]
    assert main(args) == 2
    assert "--kv-cache-gib" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"chat_template": 5}, "chat_template must be a string"),
        ({"added_tokens_decoder": "x"}, "added_tokens_decoder must map ids"),
        ({"chat_template": "{{ messages[0].content / 2 }}"}, "chat template failed on these messages: TypeError"),
    ],
)
def test_bad_tokenizer_config_is_one_line(default_model_dir: Path, tmp_path: Path, change: dict, words: str, capsys):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(default_model_dir, model)
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config | change))
    assert main(["chat", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert words in _one_error_line(capsys.readouterr().err)


def test_failed_conversions_remove_what_they_created(tmp_path: Path, tiny_dir: Path, monkeypatch) -> None:
    from minicpm import convert

    dead = tmp_path / ".out.partial-999999999-x"
    dead.mkdir()
    with pytest.raises(ValueError):
        convert.convert_checkpoint(tmp_path / "missing", tmp_path / "out")  # fails before writing anything
    assert not dead.exists()  # still, the killed conversion's leftovers are gone

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_checkpoint(tiny_dir, tmp_path / "new" / "nested" / "out")
    assert not (tmp_path / "new").exists()


def test_plan_counts_a_quantized_checkpoint_as_stored(default_model_dir: Path, capsys) -> None:
    """The default model runs its Q4_1 / Q8_0 weights as stored on CPU: the plan's weights are what
    they take decoded (codes, float32 scales and minimums; the files hold the GGUF's smaller
    blocks), not its parameters in float32."""
    import json

    assert main(["plan", "--model", str(default_model_dir), "--context", "4096", "--memory", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["checkpoint_bytes"] < plan["weight_bytes"] < 135_000_000 * 4 / 3


def test_an_internal_value_error_at_load_is_a_bug_not_a_user_error(monkeypatch, capsys) -> None:
    """Only a UserError (a flag, a file, a setting) is one line and exit 2: any other ValueError
    raised while loading propagates, to be printed with its traceback (exit 1)."""

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(LLM, "from_pretrained", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["generate", "--prompt", "x"])
    assert "minicpm: error:" not in capsys.readouterr().err


def test_an_internal_error_prints_a_traceback_and_exits_1(tmp_path: Path) -> None:
    """The program itself: a traceback on stderr and exit status 1, not a one-line user error."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from minicpm import LLM\n"
        "from minicpm.cli import main\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('an internal invariant broke')\n"
        "LLM.from_pretrained = staticmethod(broken)\n"
        "sys.exit(main(['generate', '--prompt', 'x', '--model', sys.argv[1]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: an internal invariant broke" in done.stderr
    assert "minicpm: error:" not in done.stderr


def test_a_bad_config_field_is_still_one_line(tiny_dir: Path, capsys) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps(config | {"num_attention_heads": "four"}))
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "x"]) == 2
    assert "num_attention_heads" in _one_error_line(capsys.readouterr().err)
