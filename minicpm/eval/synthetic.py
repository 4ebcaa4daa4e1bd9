"""InfiniteBench's five synthetic tasks, regenerated offline at any prompt length.

Contract:

* ``SYNTHETIC_TASKS`` names the tasks: passkey, number_string, kv_retrieval, math_find, code_run.
* ``generate(task, length, count, seed, count_tokens)`` returns ``count`` examples in the official
  line format ``{"id", "context", "input", "answer", "options": []}`` with the official JSON types:
  passkey and number_string ``answer`` is a list of one str, kv_retrieval a str, math_find a list of
  one int (one float for the median), code_run a list of one int. The texts are those of the
  benchmark's generator (``data/construct_synthetic_dataset.py`` in OpenBMB/InfiniteBench): the
  noise line and needle sentences, kv_retrieval's ``"JSON data:\\n{...}"`` context and
  ``"\\nKey: \\"<uuid>\\"\\nThe value associated with the specified key is: "`` input, math_find's
  seven ``"... The <kind> of the list is: "`` inputs over a ``str(list)`` context of ints 0..99, and
  code_run's ``functions_module.py`` listing of ``def func_<k>(x)`` chains (depth 2, 4, 6, 8 or 10,
  additions -12..17, argument -10..10).
* Length: ``count_tokens(task, example)`` is the caller's token count of the example's whole prompt
  (template and chat wrapper included). The haystack (noise lines, JSON pairs, list items,
  functions) is sized so that count is within 1% of ``length``: fitted once on the first example
  (the bare needle, a calibration at ~10% of the size, then interpolation with a bisection every
  third step, at most 24 counts), reused for the others, each of which is counted once and
  re-fitted only when outside 1% (its size then carries over to the next ones). When one haystack
  unit is worth more than 2% of ``length`` the nearest reachable count is kept (kv_retrieval pairs
  are the coarsest: about 70 tokens each, so ask for 4k tokens or more there).
* Spread like the official files, over the examples in order: passkey and number_string put the
  needle after ``round(d * N)`` of the ``N`` noise lines, ``d = i / (count - 1)`` going from 0 to 1
  (0.5 when ``count`` is 1); kv_retrieval asks the key at index ``i * P // count`` of the ``P`` pairs;
  math_find's seven question kinds and code_run's five depths come in equal consecutive blocks in
  the official order (exactly the official layout for 350 and 400 examples).
* The needle (the passkey or digit-string sentence, the asked key) occurs exactly once in the
  context; math_find's answer is computed from the list; code_run's answer is the value of the
  call, computed while the chain is built (nothing is executed).
* Deterministic: the same arguments give identical examples (``random.Random(seed)``; uuids are
  drawn from it too). Unknown task, ``count < 1``, a non-positive length or one too small to hold
  the needle and the question raise ``ValueError`` saying which.
* ``write_jsonl(examples, path)`` writes one JSON object per line (``ensure_ascii=False``),
  atomically: a temporary file in the same directory, then ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import write_atomic, writing

log = logging.getLogger("minicpm")

SYNTHETIC_TASKS = ("passkey", "number_string", "kv_retrieval", "math_find", "code_run")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLES = {
    "passkey": "The pass key is {key}. Remember it. {key} is the pass key.\n",
    "number_string": "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n",
}
QUESTIONS = {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?"}
KV_CONTEXT_PREFIX = "JSON data:\n"
KV_INPUT = '\nKey: "{key}"\nThe value associated with the specified key is: '
# (kind, the words after "The" in the input), in the official order
MATH_KINDS = (
    ("largest", "largest number"),
    ("second largest", "second largest number"),
    ("third largest", "third largest number"),
    ("smallest", "smallest number"),
    ("second smallest", "second smallest number"),
    ("third smallest", "third smallest number"),
    ("median", "median number"),
)
MATH_INPUT = "You should answer with only one number, no other words. The {what} of the list is: "
MATH_MIN, MATH_MAX = 0, 99
CODE_HEADER = "\nHere is the content of functions_module.py:\n\n"
CODE_INPUT = (
    "Please give me the exact number of the return value of {call}. "
    "Your response should end with the sentence 'The return value is:'."
)
CODE_DEPTHS = (2, 4, 6, 8, 10)
CODE_ADD = (-12, 17)
CODE_X = (-10, 10)

TOLERANCE = 0.01
_MAX_FIT_CALLS = 24
# a first guess of tokens per haystack unit, corrected by the calibration measurement
_UNIT_GUESS = {"passkey": 25.0, "number_string": 25.0, "kv_retrieval": 65.0, "math_find": 4.0, "code_run": 23.0}

CountTokens = Callable[[str, dict], int]


# ---------------------------------------------------------------- builders: (index, count, size, rng) -> example


def _depth(i: int, count: int) -> float:
    return 0.5 if count == 1 else i / (count - 1)


def _passkey_key(rng: random.Random) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(5))


def _number_string_key(rng: random.Random) -> str:
    digits = [str(rng.randint(0, 9)) for _ in range(5)]
    for _ in range(5):  # five times, a random digit is doubled in place
        pos = rng.randint(0, len(digits) - 1)
        digits.insert(pos, digits[pos])
    return "".join(digits)


def _needle_example(task: str, i: int, count: int, lines: int, rng: random.Random) -> dict[str, Any]:
    key = _passkey_key(rng) if task == "passkey" else _number_string_key(rng)
    before = round(_depth(i, count) * lines)
    context = NOISE * before + NEEDLES[task].format(key=key) + NOISE * (lines - before)
    return _line(i, context, QUESTIONS[task], [key])


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_example(task: str, i: int, count: int, pairs: int, rng: random.Random) -> dict[str, Any]:
    seen: set[str] = set()
    ids: list[str] = []
    while len(ids) < 2 * pairs:  # keys and values all distinct, so the asked key occurs once
        u = _uuid(rng)
        if u not in seen:
            seen.add(u)
            ids.append(u)
    records = dict(zip(ids[0::2], ids[1::2], strict=True))
    keys = ids[0::2]
    asked = keys[i * pairs // count]
    context = KV_CONTEXT_PREFIX + json.dumps(records, ensure_ascii=False)
    return _line(i, context, KV_INPUT.format(key=asked), records[asked])


def math_kind(i: int, count: int) -> str:
    """The math_find question kind of example ``i`` of ``count``: seven equal blocks, official order."""
    return MATH_KINDS[i * len(MATH_KINDS) // count][0]


def math_answer(kind: str, values: Sequence[int]) -> int | float:
    """The answer to a math_find question: k-th largest/smallest distinct value, or the median (a float)."""
    if kind == "median":
        ordered = sorted(values)
        n = len(ordered)
        return float(ordered[n // 2]) if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    rank = {"second": 1, "third": 2}.get(kind.split()[0], 0)
    distinct = sorted(set(values), reverse="largest" in kind)
    return distinct[rank]


def _math_example(task: str, i: int, count: int, size: int, rng: random.Random) -> dict[str, Any]:
    kind = math_kind(i, count)
    what = dict(MATH_KINDS)[kind]
    # the official value ranges: a lowered top for the "largest" kinds, a raised bottom for the
    # "smallest" kinds, one of the two (a coin flip) for the median
    if "largest" in kind or (kind == "median" and rng.random() <= 0.5):
        lo, hi = MATH_MIN, rng.randint(int(MATH_MAX * 0.8), MATH_MAX)
    else:
        lo, hi = rng.randint(MATH_MIN, int(MATH_MAX * 0.2)), MATH_MAX
    while True:  # "third largest" needs three distinct values (only ever redrawn for tiny lists)
        values = [rng.randint(lo, hi) for _ in range(size)]
        if len(set(values)) >= 3:
            break
    return _line(i, str(values), MATH_INPUT.format(what=what), [math_answer(kind, values)])


def code_depth(i: int, count: int) -> int:
    """The code_run chain depth of example ``i`` of ``count``: five equal blocks of 2, 4, 6, 8, 10."""
    return CODE_DEPTHS[i * len(CODE_DEPTHS) // count]


def _code_example(task: str, i: int, count: int, size: int, rng: random.Random) -> dict[str, Any]:
    depth = code_depth(i, count)
    # ``size`` distinct indices from 1..2*size (officially 1..2*MAX_NUM_FUNC), cut into ``depth``
    # levels of near-equal size; each function of a level calls one of the next level's
    names = rng.sample(range(1, 2 * size + 1), size)
    levels: list[list[int]] = []
    start = 0
    for level in range(depth):
        n = size // depth + (1 if level < size % depth else 0)
        levels.append(names[start : start + n])
        start += n
    callee: dict[int, int | None] = {}
    addition: dict[int, int] = {}
    texts: dict[int, str] = {}
    for level, members in enumerate(levels):
        for name in members:
            add = rng.randint(*CODE_ADD)
            target = rng.choice(levels[level + 1]) if level + 1 < depth else None
            callee[name], addition[name] = target, add
            call = "x" if target is None else f"func_{target}(x)"
            tail = "" if add == 0 else f" - {-add}" if add < 0 else f" + {add}"
            texts[name] = f"def func_{name}(x):\n    return {call}{tail}\n"
    first = rng.choice(levels[0])
    x = rng.randint(*CODE_X)
    value, node = x, first
    while node is not None:  # the chain's value: x plus every addition on the way down
        value += addition[node]
        node = callee[node]
    context = CODE_HEADER + "".join(texts[name] + "\n" for name in sorted(texts))
    return _line(i, context, CODE_INPUT.format(call=f"func_{first}({x})"), [value])


def _line(i: int, context: str, question: str, answer: Any) -> dict[str, Any]:
    return {"id": i, "context": context, "input": question, "answer": answer, "options": []}


_BUILDERS: dict[str, Callable[[str, int, int, int, random.Random], dict[str, Any]]] = {
    "passkey": _needle_example,
    "number_string": _needle_example,
    "kv_retrieval": _kv_example,
    "math_find": _math_example,
    "code_run": _code_example,
}


def _min_size(task: str, i: int, count: int) -> int:
    """The smallest haystack: no noise line, one JSON pair, three list items, one function per level."""
    if task == "code_run":
        return code_depth(i, count)
    return {"passkey": 0, "number_string": 0, "kv_retrieval": 1, "math_find": 3}[task]


# ---------------------------------------------------------------- fitting the haystack to a token count


def _search(
    measure: Callable[[int], int],
    target: int,
    goal: float,
    lowest: int,
    start: int,
    per_unit: float,
    seen: dict[int, int],
) -> tuple[int, float]:
    """A size whose count is within ``goal`` of ``target`` (else the closest one measured), and the
    tokens-per-unit estimate: interpolation between the nearest sizes below and above, every third
    step a bisection, at most ``_MAX_FIT_CALLS`` measurements. ``seen`` maps sizes already measured."""
    below: tuple[int, int] | None = None
    above: tuple[int, int] | None = None
    for s, t in seen.items():
        if t < target and (below is None or s > below[0]):
            below = (s, t)
        if t > target and (above is None or s < above[0]):
            above = (s, t)
    size = max(lowest, start)
    last: tuple[int, int] | None = None
    bracketed = 0
    prior = per_unit  # slopes measured over few units are noisy (the content is redrawn): keep them near it

    def slope(a: tuple[int, int], b: tuple[int, int]) -> float:
        return min(max((b[1] - a[1]) / (b[0] - a[0]), prior / 2), prior * 2)

    for _ in range(_MAX_FIT_CALLS):
        if size not in seen:
            seen[size] = measure(size)
        t = seen[size]
        if abs(t - target) <= goal:
            return size, per_unit
        if t < target and (below is None or size > below[0]):
            below = (size, t)
        if t > target and (above is None or size < above[0]):
            above = (size, t)
        if t > target and size <= lowest:
            break  # even the smallest haystack is too long
        if below and above:
            if above[0] - below[0] <= 1:
                break  # adjacent sizes straddle the target: the closer one is the best there is
            per_unit = slope(below, above)
            bracketed += 1
            if bracketed % 3 == 0:  # every third step bisects: the bracket at least halves that often
                nxt = (below[0] + above[0]) // 2
            else:  # interpolate, kept strictly inside the bracket
                nxt = below[0] + round((target - below[1]) / per_unit)
                nxt = min(max(nxt, below[0] + 1), above[0] - 1)
        else:
            if last is not None and last[0] != size:
                per_unit = slope(last, (size, t))
            step = round((target - t) / per_unit) or (1 if t < target else -1)
            nxt = max(lowest, size + step)
            while nxt in seen and nxt != size:
                nxt += 1 if t < target else -1
                if nxt < lowest:
                    break
            if nxt < lowest or nxt == size:
                break
        last = (size, t)
        size = nxt
    best = min(seen, key=lambda s: (abs(seen[s] - target), s))
    return best, per_unit


def generate(
    task: str,
    length: int,
    count: int,
    seed: int,
    count_tokens: CountTokens,
) -> list[dict[str, Any]]:
    """``count`` examples of ``task`` whose prompts count about ``length`` tokens (see the module doc)."""
    if task not in SYNTHETIC_TASKS:
        raise UserError(f"unknown synthetic task {task!r}; choose one of {', '.join(SYNTHETIC_TASKS)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"count must be a positive integer (at least 1 example), got {count!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise UserError(f"length must be a positive number of tokens, got {length!r}")
    if not callable(count_tokens):
        raise UserError("count_tokens must be a function (task, example) -> number of prompt tokens")
    master = random.Random(seed)
    seeds = [master.getrandbits(64) for _ in range(count)]
    build = _BUILDERS[task]
    tol = TOLERANCE * length
    calls = 0

    def make(i: int, size: int) -> dict[str, Any]:
        return build(task, i, count, size, random.Random(seeds[i]))

    def measurer(i: int) -> Callable[[int], int]:
        def measure(size: int) -> int:
            nonlocal calls
            calls += 1
            return int(count_tokens(task, make(i, size)))

        return measure

    # fit on the first example: the smallest haystack (cheap), a calibration at ~10% of the way, then
    # interpolation from there, aiming well inside the tolerance so that the other examples' own
    # variation seldom takes them out of it
    lowest = _min_size(task, 0, count)
    measure0 = measurer(0)
    seen: dict[int, int] = {lowest: measure0(lowest)}
    floor = seen[lowest]
    if floor > length + tol:
        raise UserError(
            f"length {length} is too small for {task}: the needle and the question with the smallest haystack "
            f"already take {floor} tokens"
        )
    per_unit = _UNIT_GUESS[task]
    fitted = lowest
    if floor < length - tol / 4:
        calibration = lowest + max(1, round(0.1 * (length - floor) / per_unit))
        seen[calibration] = measure0(calibration)
        if seen[calibration] > floor:
            per_unit = (seen[calibration] - floor) / (calibration - lowest)
        start = calibration + round((length - seen[calibration]) / per_unit)
        fitted, per_unit = _search(measure0, length, tol / 4, lowest, start, per_unit, seen)
    log.debug("%s at %d tokens: haystack size %d after %d token counts", task, length, fitted, calls)

    # each example is checked; one outside the tolerance is re-fitted, and its size becomes the one
    # the next examples start from (examples come in blocks of one shape: depth, question kind)
    examples: list[dict[str, Any]] = []
    for i in range(count):
        lowest_i = _min_size(task, i, count)
        size = max(fitted, lowest_i)
        example = make(i, size)
        tokens = int(count_tokens(task, example))
        calls += 1
        if abs(tokens - length) > tol:
            if tokens > length + tol and size <= lowest_i:
                raise UserError(
                    f"length {length} is too small for {task} example {i}: the needle and the question with the "
                    f"smallest haystack already take {tokens} tokens"
                )
            start = size + round((length - tokens) / per_unit)
            best, _ = _search(measurer(i), length, tol / 2, lowest_i, start, per_unit, {size: tokens})
            if best != size:
                example = make(i, best)
            fitted = best
        examples.append(example)
    log.debug("%s at %d tokens: %d examples, %d token counts in all", task, length, count, calls)
    return examples


def write_jsonl(examples: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """``examples`` as JSON lines (the official format), replacing ``path`` atomically."""
    target = Path(path)
    with writing(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "x", encoding="utf-8", newline="\n") as out:
            for example in examples:
                out.write(json.dumps(example, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())

    write_atomic(target, write)
