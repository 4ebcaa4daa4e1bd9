"""Files written whole or not at all, and write errors that name their path.

Contract:

* :func:`write_atomic` calls ``write(tmp)`` for a temporary sibling of ``path`` and renames it onto
  ``path`` only once ``write`` returned: after any failure (a full disk, an exceeded quota, Ctrl-C)
  the temporary file is gone and ``path`` holds what it held before, so nothing half-written is
  left under either name. :func:`write_text_atomic` is the same for a text.
* Inside :func:`writing`, an ``OSError`` without a file name gets ``path`` as its file name, and
  safetensors' own error for a failed write becomes the ``OSError`` it stands for (its errno read
  from the message), so the command line's one ``minicpm: error:`` line names the path.
  :func:`is_disk_full` tells the errors of a full disk or quota (ENOSPC, EDQUOT).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Errors raised while writing ``path`` name it (see the module's contract)."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except SafetensorError as exc:  # e.g. "I/O error: No space left on device (os error 28)"
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """``write(tmp)``, then ``tmp`` renamed onto ``path``; nothing is left behind on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with writing(path):
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
