"""Scoring rules for the long-context suites: InfiniteBench, RULER and needle-in-a-haystack.

Contract:

- InfiniteBench (OpenBMB, ``src/compute_scores.py`` and ``src/eval_utils.py``): ``ground_truth`` builds one
  example's label from a loaded JSONL line exactly as the benchmark does (the two choice tasks get an
  ``[option_text, letter]`` pair, every other task keeps its ``answer`` with the JSON types as loaded), and
  ``score_infinitebench`` scores one prediction against such a label with the benchmark's rule for the task,
  as a float in [0, 1]. ``infinitebench_averages`` gives the card's two averages from per-task scores
  (in whatever scale the scores are given). Labels in the older flat form the benchmark also accepts
  (``"71432"`` instead of ``["71432"]``, ``88`` instead of ``[88]``, ``[1, 2]`` instead of ``[[1, 2]]``)
  score the same, as they do in the benchmark.
- RULER (NVIDIA, ``scripts/eval/synthetic/constants.py``, ``scripts/eval/evaluate.py``): ``string_match_all``
  and ``string_match_part`` take raw predictions and per-sample reference lists, post-process each prediction
  as RULER does (strip, control characters to newlines, strip) and return the mean x100 rounded to 2
  decimals; ``match_all`` and ``match_part`` are the per-sample scores in [0, 1].
- Needle in a haystack: ``needle_score`` is the offline substitute for the original GPT judge: the fraction of
  the key facts found in the prediction, case-insensitively.

Where the benchmark's code and a plain-words reading of its rules differ, the code is followed; each such
place carries a comment saying so. Nothing here needs the network; ROUGE needs the ``rouge_score`` package,
imported only when a summary is scored.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import UserError

__all__ = [
    "INFINITEBENCH_TASKS",
    "MAX_NEW_TOKENS",
    "WITHOUT_CODE_MATH",
    "ground_truth",
    "infinitebench_averages",
    "match_all",
    "match_part",
    "needle_score",
    "ruler_postprocess",
    "score_infinitebench",
    "string_match_all",
    "string_match_part",
]

# ----------------------------------------------------------------------------------------------------------
# InfiniteBench: tasks, generation limits, labels
# ----------------------------------------------------------------------------------------------------------

#: The 12 tasks, in the order of the model card's results table.
INFINITEBENCH_TASKS: tuple[str, ...] = (
    "passkey",
    "number_string",
    "kv_retrieval",
    "longbook_choice_eng",
    "longbook_qa_chn",
    "longbook_qa_eng",
    "longbook_sum_eng",
    "longdialogue_qa_eng",
    "math_calc",
    "math_find",
    "code_debug",
    "code_run",
)

#: The tasks of the card's "avg w/o code&math" column: the first 8.
WITHOUT_CODE_MATH: tuple[str, ...] = INFINITEBENCH_TASKS[:8]

#: The benchmark's per-task generation limits (``DATA_NAME_TO_MAX_NEW_TOKENS``).
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_choice_eng": 40,
    "longbook_qa_chn": 40,
    "longbook_qa_eng": 40,
    "longbook_sum_eng": 1200,
    "longdialogue_qa_eng": 40,
    "math_calc": 30000,
    "math_find": 3,
    "code_debug": 5,
    "code_run": 5,
}

_CHOICE_TASKS = ("longbook_choice_eng", "code_debug")
_LETTERS = "ABCD"


def _check_task(task: str) -> None:
    if task not in INFINITEBENCH_TASKS:
        raise UserError(f"unknown InfiniteBench task {task!r}; known tasks: {', '.join(INFINITEBENCH_TASKS)}")


def ground_truth(task: str, example: dict) -> Any:
    """The label the benchmark scores ``example`` (one loaded JSONL line) against.

    For longbook_choice_eng and code_debug: ``[option_text, letter]``, the letter being A-D by the answer's
    index in ``options``; an answer given as a one-element list is looked up the same way, and one given as
    ``[text, letter]`` is kept. For every other task: ``example["answer"]`` unchanged (same object, same JSON
    types). Raises ValueError naming the task and the problem when the example is malformed.
    """
    _check_task(task)
    if not isinstance(example, dict) or "answer" not in example:
        raise UserError(f"{task}: example has no 'answer' field")
    answer = example["answer"]
    if task not in _CHOICE_TASKS:
        _check_label(task, answer)
        return answer

    # The benchmark's get_answer: a string, a one-element list, or an already built [text, letter] pair.
    if isinstance(answer, list) and len(answer) == 2 and answer[1] in list(_LETTERS):
        _check_label(task, answer)
        return answer
    if isinstance(answer, list) and len(answer) == 1:
        text = answer[0]
    elif isinstance(answer, str):
        text = answer
    else:
        raise UserError(
            f"{task}: answer must be an option string, a one-element list or a [text, letter] pair, got {answer!r}"
        )
    options = example.get("options")
    if not isinstance(options, list):
        raise UserError(f"{task}: example has no 'options' list")
    if text not in options:
        raise UserError(f"{task}: answer {text!r} is not among the options {options!r}")
    index = options.index(text)
    if index >= len(_LETTERS):
        raise UserError(f"{task}: answer {text!r} is option {index + 1}, but only A-D exist")
    return [text, _LETTERS[index]]


def _first(label: Any) -> Any:
    """The benchmark's ``if isinstance(label, list): label = label[0]``."""
    if isinstance(label, (list, tuple)):
        if not label:
            raise UserError("empty label list")
        return label[0]
    return label


def _check_label(task: str, label: Any) -> None:
    """Reject labels of a type the task's rule cannot score (the benchmark would crash or always miss)."""

    def bad(why: str) -> UserError:
        return UserError(f"{task}: malformed label {label!r}: {why}")

    if task in ("passkey", "number_string"):
        if isinstance(label, (list, tuple)) and not label:
            raise bad("empty list")
        if not isinstance(_first(label), str):
            raise bad("expected a digit string or a list of them")
    elif task == "kv_retrieval":
        if not isinstance(label, str):
            raise bad("expected a string")
    elif task in ("longbook_qa_eng", "longbook_qa_chn", "longbook_sum_eng"):
        refs = [label] if isinstance(label, str) else label
        if not isinstance(refs, (list, tuple)) or not refs or not all(isinstance(r, str) for r in refs):
            raise bad("expected a string or a non-empty list of strings")
    elif task == "longdialogue_qa_eng":
        if not isinstance(label, (list, tuple)) or not label or not isinstance(label[0], str):
            raise bad("expected a non-empty list of names")
    elif task == "math_find":
        if isinstance(label, (list, tuple)) and not label:
            raise bad("empty list")
        value = _first(label)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("expected an int or a float (or a list holding one)")
    elif task == "math_calc":
        if not isinstance(label, (list, tuple)) or not label:
            raise bad("expected a non-empty list")
        values = label[0] if isinstance(label[0], (list, tuple)) else label
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise bad("expected a non-empty list of ints (or a list holding one)")
    elif task == "code_run":
        if isinstance(label, (list, tuple)) and not label:
            raise bad("empty list")
        value = _first(label)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("expected an int (or a list holding one)")
    elif task in _CHOICE_TASKS and not (
        isinstance(label, (list, tuple))
        and len(label) == 2
        and isinstance(label[0], str)
        and label[1] in list(_LETTERS)
    ):
        raise bad("expected an [option_text, letter] pair (build it with ground_truth)")


# ----------------------------------------------------------------------------------------------------------
# InfiniteBench: one example's score
# ----------------------------------------------------------------------------------------------------------

# Characters each rule turns into spaces before splitting into words, in the benchmark's order (the order
# matters only for code_debug, whose list holds the words "Option"/"option").
_KV_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")
_DIALOGUE_SEPARATORS = _KV_SEPARATORS
_CHOICE_SEPARATORS = ("\n", '"', "'", ".", ",", "?", "!", "{", "}")
_CODE_RUN_SEPARATORS = ("\n", ".", "`", "'", '"', ":")
_CODE_DEBUG_SEPARATORS = ("\n", "`", "'", '"', "-", "*", "Option", "option")

_CHOICE_PREFIXES = ("answer is:", "answer:", "answer is", "option is")
_CODE_DEBUG_PREFIXES = ("answer is:", "is:", "answer:", "correct option is:")

# The benchmark's Chinese punctuation set (normalize_zh_answer), character for character. It lacks the
# opening book-title mark U+300A while it has the closing one U+300B; kept so, as the benchmark scores.
_CN_PUNCTUATION = (
    "\uff01\uff1f\uff61\u3002\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d\uff0f"
    "\uff1a\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f\uff40\uff5b\uff5c\uff5d\uff5e\uff5f"
    "\uff60\uff62\uff63\uff64\u3001\u3003\u300b\u300c\u300d\u300e\u300f\u3010\u3011\u3014\u3015\u3016\u3017"
    "\u3018\u3019\u301a\u301b\u301c\u301d\u301e\u301f\u3030\u303e\u303f\u2013\u2014\u2018\u2019\u201b\u201c"
    "\u201d\u201e\u201f\u2026\u2027\ufe4f."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ZH_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)

_ASCII_DIGIT_RUN = re.compile(r"[0-9]+")  # the benchmark's re.split("[^0-9]", ...): ASCII digits only
_FIRST_NUMBER = re.compile(r"\d+\.\d+|\d+")  # math_find's pattern, as written (\d is Unicode-aware)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPACE_RUNS = re.compile(r" {2,}")


def _replace_all(text: str, separators: Iterable[str]) -> str:
    for sep in separators:
        text = text.replace(sep, " ")
    return text


def _squeeze_spaces(text: str) -> str:
    """The benchmark's ``while "  " in pred: pred = pred.replace("  ", " ")`` (spaces only, not tabs)."""
    return _SPACE_RUNS.sub(" ", text)


def _first_digit_run(prediction: str) -> str:
    match = _ASCII_DIGIT_RUN.search(prediction)
    return match.group(0) if match else ""


def _score_passkey(prediction: str, label: Any) -> bool:
    # The label is a list in the data; the benchmark compares the first element (a digit string).
    return _first(label) == _first_digit_run(prediction)


def _score_kv_retrieval(prediction: str, label: Any) -> bool:
    return label in _replace_all(prediction, _KV_SEPARATORS).split()


def _score_longdialogue(prediction: str, label: Any) -> bool:
    # Only answer[0] counts, and it is not upper-cased (the data's names are upper case already).
    name = label[0]
    words = [w.upper() for w in _replace_all(prediction.strip(), _DIALOGUE_SEPARATORS).split()]
    return name in words


def _score_code_run(prediction: str, label: Any) -> bool:
    expected = _first(label)
    words = _replace_all(prediction.strip(), _CODE_RUN_SEPARATORS).split()
    if not words:
        return False
    try:
        return int(words[-1]) == expected
    except ValueError:
        return False


def _score_math_find(prediction: str, label: Any) -> bool:
    expected = _first(label)
    match = _FIRST_NUMBER.search(prediction)
    if match is None:
        return False
    text = match.group(0).strip()
    if isinstance(expected, int):
        # The benchmark calls int() on the match; for a decimal such as "48.5" (or "48.0") that raises and
        # crashes its scorer. Here it counts as wrong: an int label is compared as an int only.
        try:
            return int(text) == expected
        except ValueError:
            return False
    return float(text) == expected


def _score_math_calc(prediction: str, label: Any, model: str) -> float:
    if not isinstance(label, (list, tuple)) or not label:
        raise UserError(f"math_calc: expected a non-empty list label, got {label!r}")
    values = label[0] if isinstance(label[0], (list, tuple)) else label
    if not values:
        raise UserError("math_calc: empty list of values")
    # Digit runs only: a minus sign is dropped, so a negative intermediate value can never match.
    numbers = [int(run) for run in _ASCII_DIGIT_RUN.findall(prediction)]
    # The benchmark's prompt makes GPT-4 repeat the first operand first; it drops that number only when the
    # model name is exactly "gpt4" (its model_name for GPT-4), and so does this.
    if model == "gpt4":
        numbers = numbers[1:]
    correct = 0
    for expected, got in zip(values, numbers, strict=False):
        if expected != got:
            break
        correct += 1
    return correct / len(values)


def _after_prefix(text: str, prefixes: Sequence[str]) -> tuple[bool, str | None]:
    """Find the first prefix (in list order) present in ``text``: ``(found, rest)``.

    ``rest`` is the text after the prefix, skipping one character, or None when the text ends before that
    character (the benchmark then scores wrong, whatever the label).
    """
    for prefix in prefixes:
        idx = text.find(prefix)
        if idx == -1:
            continue
        start = idx + len(prefix) + 1
        return True, (text[start:] if len(text) >= start else None)
    return False, None


def _score_choice(prediction: str, label: Any) -> bool:
    pred = prediction.strip()
    if not pred:
        return False
    if pred[0] in _LETTERS:
        return pred[0] in label
    # List membership: the whole prediction equals the option text (or the letter), not a substring of it.
    if pred in label:
        return True
    pred = _squeeze_spaces(_replace_all(pred, _CHOICE_SEPARATORS))
    found, after = _after_prefix(pred, _CHOICE_PREFIXES)
    if found:
        return after is not None and any(after.startswith(s) for s in label)
    # The benchmark tests ``word in "ABCD"``, a substring test: besides the bare letters, a word such as "AB",
    # "BCD" or "ABCD" also stops the search (and then scores wrong). Followed here, over the plain reading
    # "the first word that is exactly A, B, C or D".
    for word in pred.split():
        if word in _LETTERS:
            return word in label
    return False


def _score_code_debug(prediction: str, label: Any) -> bool:
    function_name, letter = label[0], label[1]
    pred = prediction.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    pred = _squeeze_spaces(_replace_all(pred, _CODE_DEBUG_SEPARATORS))
    found, after = _after_prefix(pred, _CODE_DEBUG_PREFIXES)
    if not found or after is None:
        return False  # no prefix (so a bare "A" scores 0), or nothing after it
    return after.startswith(letter) or after.startswith(function_name)


def _normalize_en(text: str) -> str:
    """SQuAD normalisation: lower case, drop ASCII punctuation, drop a/an/the, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _normalize_zh(text: str) -> str:
    """Lower case, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def _f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return 2 * precision * recall / (precision + recall)


def _references(label: Any) -> list[str]:
    # The data holds lists; a bare string is one reference (the benchmark would iterate its characters).
    return [label] if isinstance(label, str) else list(label)


def _qa_f1_en(prediction: str, label: Any) -> float:
    tokens = _normalize_en(prediction).split()
    return max((_f1(tokens, _normalize_en(ref).split()) for ref in _references(label)), default=0.0)


def _qa_f1_zh(prediction: str, label: Any) -> float:
    chars = list(_normalize_zh(prediction))
    return max((_f1(chars, list(_normalize_zh(ref))) for ref in _references(label)), default=0.0)


_ROUGE_SCORER: Any = None


def _rouge_lsum(prediction: str, label: Any) -> float:
    """ROUGE-Lsum F-measure as Hugging Face ``evaluate``'s "rouge" computes it for one pair.

    ``evaluate`` builds ``rouge_score.RougeScorer`` with ``use_stemmer=False`` and no tokenizer, adds no
    sentence splitting (so rougeLsum splits summaries on "\\n" only, as rouge_score does by default), and
    scores a list of references with ``score_multi`` (the reference with the best F-measure).
    """
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    if isinstance(label, (list, tuple)):
        if not label:
            raise UserError("longbook_sum_eng: empty list of reference summaries")
        score = _ROUGE_SCORER.score_multi(list(label), prediction)
    else:
        score = _ROUGE_SCORER.score(label, prediction)
    return float(score["rougeLsum"].fmeasure)


def score_infinitebench(task: str, prediction: str, label: Any, model: str = "") -> float:
    """One example's InfiniteBench score in [0, 1], with the benchmark's rule for ``task``.

    ``label`` is what ``ground_truth`` returns (or the flat forms the benchmark also accepts); ``model`` only
    matters for math_calc, where the name "gpt4" drops the first predicted number as the benchmark does.
    Raises ValueError for an unknown task or a label the task's rule cannot score.
    """
    _check_task(task)
    if not isinstance(prediction, str):
        raise TypeError(f"{task}: prediction must be a str, got {type(prediction).__name__}")
    _check_label(task, label)
    if task in ("passkey", "number_string"):
        return float(_score_passkey(prediction, label))
    if task == "kv_retrieval":
        return float(_score_kv_retrieval(prediction, label))
    if task == "longbook_choice_eng":
        return float(_score_choice(prediction, label))
    if task == "longbook_qa_eng":
        return _qa_f1_en(prediction, label)
    if task == "longbook_qa_chn":
        return _qa_f1_zh(prediction, label)
    if task == "longbook_sum_eng":
        return _rouge_lsum(prediction, label)
    if task == "longdialogue_qa_eng":
        return float(_score_longdialogue(prediction, label))
    if task == "math_calc":
        return _score_math_calc(prediction, label, model)
    if task == "math_find":
        return float(_score_math_find(prediction, label))
    if task == "code_debug":
        return float(_score_code_debug(prediction, label))
    return float(_score_code_run(prediction, label))  # code_run, the last task left


def infinitebench_averages(scores: dict[str, float]) -> dict[str, float | None]:
    """The card's averages: ``avg`` over all 12 tasks and ``avg_wo_code_math`` over the first 8.

    Plain means, in the scale the scores come in; an average is None when one of its tasks is missing (or
    None). Keys that are not task names are ignored.
    """

    def mean(tasks: Sequence[str]) -> float | None:
        values = [scores.get(t) for t in tasks]
        if any(v is None for v in values):
            return None
        return sum(float(v) for v in values) / len(values)  # type: ignore[arg-type]

    return {"avg": mean(INFINITEBENCH_TASKS), "avg_wo_code_math": mean(WITHOUT_CODE_MATH)}


# ----------------------------------------------------------------------------------------------------------
# RULER
# ----------------------------------------------------------------------------------------------------------

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def ruler_postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, replace each character U+0000-U+001F by a newline, strip again."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def _check_refs(refs: Sequence[str]) -> None:
    if isinstance(refs, str):
        raise TypeError("references of one sample must be a list of strings, not a string")
    if not refs:
        raise UserError("a sample needs at least one reference")


def match_all(pred: str, refs: Sequence[str]) -> float:
    """One sample's string_match_all score in [0, 1]: the fraction of ``refs`` found in the prediction
    (case-insensitive substring, after RULER's post-processing)."""
    _check_refs(refs)
    text = ruler_postprocess(pred).lower()
    return sum(1.0 for r in refs if r.lower() in text) / len(refs)


def match_part(pred: str, refs: Sequence[str]) -> float:
    """One sample's string_match_part score: 1.0 if any of ``refs`` is found in the prediction, else 0.0."""
    _check_refs(refs)
    text = ruler_postprocess(pred).lower()
    return 1.0 if any(r.lower() in text for r in refs) else 0.0


def _ruler_mean(predictions: Sequence[str], references: Sequence[Sequence[str]], one: Any) -> float:
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise UserError("no samples to score")
    total = sum(one(p, r) for p, r in zip(predictions, references, strict=True))
    return round(total / len(predictions) * 100, 2)


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's string_match_all: mean over samples of the fraction of references found, x100, 2 decimals."""
    return _ruler_mean(predictions, references, match_all)


def string_match_part(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's string_match_part: mean over samples of "any reference found", x100, 2 decimals."""
    return _ruler_mean(predictions, references, match_part)


# ----------------------------------------------------------------------------------------------------------
# Needle in a haystack
# ----------------------------------------------------------------------------------------------------------


def needle_score(prediction: str, facts: Sequence[str]) -> float:
    """The fraction of the key ``facts`` (e.g. "sandwich", "Dolores Park") found in the prediction,
    case-insensitively; 1.0 when all are found. The original uses a GPT judge; this is the offline rule."""
    if isinstance(facts, str):
        raise TypeError("facts must be a list of strings, not a string")
    if not facts:
        raise UserError("needle_score needs at least one key fact")
    text = prediction.lower()
    return sum(1 for fact in facts if fact.lower() in text) / len(facts)
