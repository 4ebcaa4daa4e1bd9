"""A full disk, for real: each command runs in a mount namespace of its own (``unshare``) over a
small tmpfs, and every write the project makes (conversions, the default model's cache, the kernel
build cache, eval output, chat history) must end in one ``minicpm: error:`` line naming the path,
exit 2, and leave nothing half-written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import random_model, tiny_config

from minicpm.default_model import default_gguf

UNSHARE = shutil.which("unshare")


def _namespaces_work() -> bool:
    if UNSHARE is None:
        return False
    done = subprocess.run([UNSHARE, "-rm", "true"], capture_output=True)
    return done.returncode == 0


pytestmark = pytest.mark.skipif(
    not _namespaces_work(), reason="needs unshare -rm (user and mount namespaces) for a real full tmpfs"
)
MINICPM = [sys.executable, "-m", "minicpm.cli"]
# mount a tmpfs of $1 over $2, run the rest, then list the files left on it (into $2.left, outside it)
SCRIPT = (
    'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; d="$2"; shift 2; "$@"; rc=$?; '
    'find "$d" ! -type d > "$d.left"; exit $rc'
)


def on_full_disk(tmp_path: Path, size: str, args: list[str], env: dict[str, str] | None = None, stdin: str = ""):
    """Run ``minicpm ARGS`` with ``tmp_path / "full"`` a tmpfs of ``size``; (exit, stderr, what is left on it)."""
    full = tmp_path / "full"
    full.mkdir(exist_ok=True)
    args = [a.replace("FULL", str(full)) for a in args]
    env = {**os.environ, "MINICPM_CACHE": str(tmp_path / "cache"), **(env or {})}
    env = {k: v.replace("FULL", str(full)) for k, v in env.items()}
    done = subprocess.run(
        [UNSHARE, "-rm", "sh", "-c", SCRIPT, "sh", size, str(full), *MINICPM, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode != 99, done.stderr
    return done.returncode, done.stderr, (tmp_path / "full.left").read_text().splitlines()


def assert_one_error_line(rc: int, err: str, path: Path, left: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.startswith("minicpm: error:")]
    assert rc == 2 and len(lines) == 1, err
    assert "No space left on device" in lines[0] and str(path) in lines[0], lines[0]
    assert "Traceback" not in err, err
    # the kernel cache's lock file is empty by design (it only takes a lock): nothing half-written
    written = [f for f in left if Path(f).name != ".build.lock"]
    assert written == [], f"half-written files left: {written}"


@pytest.fixture(scope="module")
def tiny(default_model_dir: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    config = tiny_config(vocab_size=49152, hidden_size=128, max_position_embeddings=2048, rope_scaling=None)
    random_model(config).save_pretrained(path)  # about 50 MB of float32
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


def test_convert_and_the_default_models_cache(tiny: Path, default_model_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    for source, size in ((tiny, "8m"), (default_gguf(), "16m")):
        rc, err, left = on_full_disk(tmp_path, size, ["convert", str(source), "FULL/out"])
        assert_one_error_line(rc, err, full / "out", left)
    # the first use of the default model converts it into the cache: here a full one
    rc, err, left = on_full_disk(
        tmp_path, "16m", ["generate", "--prompt", "Hi", "--max-new-tokens", "1"], env={"MINICPM_CACHE": "FULL"}
    )
    assert_one_error_line(rc, err, full, left)


def test_kernel_cache_eval_output_and_chat_history(tiny: Path, default_model_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    model = ["--model", str(default_model_dir)]
    rc, err, left = on_full_disk(
        tmp_path, "64k", ["generate", *model, "--prompt", "Hi", "--max-new-tokens", "1"], env={"MINICPM_CACHE": "FULL"}
    )
    assert_one_error_line(rc, err, full / "kernels", left)
    args = ["eval", "generate", "passkey", "--length", "600", "--count", "3", "--model", str(tiny)]
    rc, err, left = on_full_disk(tmp_path, "4k", [*args, "--output", "FULL/data"])
    assert_one_error_line(rc, err, full / "data", left)
    # chat history: readline keeps it only in a terminal
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "MINICPM_CACHE": str(full), "MINICPM_CPU_KERNELS": "off", "TERM": "dumb"}
    args = ["-rm", "sh", "-c", SCRIPT, "sh", "4k", str(full), *MINICPM, "chat", *model, "--max-new-tokens", "1"]
    child = pexpect.spawn(UNSHARE, args, env=env, timeout=120, dimensions=(40, 200))
    child.expect(b">>> ")
    for word in ("first", "x" * 3000, "y" * 3000):  # a history longer than the disk
        child.sendline(word.encode())
        child.expect(b">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    err = child.before.decode(errors="replace").replace("\r", "")
    left = (tmp_path / "full.left").read_text().splitlines()
    assert_one_error_line(child.exitstatus, err, full / "chat_history", left)
