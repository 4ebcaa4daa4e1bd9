"""minicpm.eval.synthetic: InfiniteBench's synthetic tasks in the official shapes, fitted to a token count."""

from __future__ import annotations

import itertools
import json
import re
import statistics
import uuid

import pytest

from minicpm.eval.synthetic import (
    CODE_DEPTHS,
    NOISE,
    SYNTHETIC_TASKS,
    generate,
    write_jsonl,
)

FIELDS = ["id", "context", "input", "answer", "options"]
KV_INPUT = re.compile(r'\nKey: "([0-9a-f-]{36})"\nThe value associated with the specified key is: ')
MATH_INPUT = re.compile(r"You should answer with only one number, no other words\. The (.+) of the list is: ")
MATH_KINDS = [
    "largest number",
    "second largest number",
    "third largest number",
    "smallest number",
    "second smallest number",
    "third smallest number",
    "median number",
]
CODE_CALL = re.compile(r"func_[0-9]+\(\-?[0-9]+\)")
CODE_FUNC = re.compile(r"def func_(\d+)\(x\):\n    return (?:func_(\d+)\(x\)|x)(?: ([+-]) (\d+))?\n\n")
CODE_HEADER = "\nHere is the content of functions_module.py:\n\n"


class Counter:
    """count_tokens: the real tokenizer of the default model over a stand-in prompt; counts its calls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def prompt(self, example: dict) -> str:
        return f"Read this.\n\n{example['context']}\n\n{example['input']}"

    def tokens(self, example: dict) -> int:
        return len(self.tokenizer.encode(self.prompt(example), add_special_tokens=False))

    def __call__(self, task: str, example: dict) -> int:
        assert task in SYNTHETIC_TASKS
        assert list(example) == FIELDS
        self.calls += 1
        return self.tokens(example)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from minicpm.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(default_model_dir)


@pytest.fixture
def counter(tokenizer) -> Counter:
    return Counter(tokenizer)


def official_shape(example: dict, i: int) -> None:
    assert list(example) == FIELDS
    assert example["id"] == i
    assert isinstance(example["context"], str) and isinstance(example["input"], str)
    assert example["options"] == []


# kv_retrieval's JSON pairs are ~70 tokens each: 1% of the length must hold half of one
LENGTHS = {"passkey": 2000, "number_string": 2000, "kv_retrieval": 4000, "math_find": 2000, "code_run": 3000}


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_prompt_within_one_percent_with_few_token_counts(task, counter):
    length, count = LENGTHS[task], 5
    examples = generate(task, length, count, 7, counter)
    assert len(examples) == count
    for i, example in enumerate(examples):
        official_shape(example, i)
        tokens = counter.tokens(example)
        assert abs(tokens - length) <= 0.01 * length, (task, i, tokens)
    # one check per example, a handful to fit the first, rare re-fits
    assert counter.calls <= 2 * count + 12, counter.calls


@pytest.mark.parametrize(
    ("task", "needle", "question", "digits"),
    [
        ("passkey", "The pass key is {key}. Remember it. {key} is the pass key.\n", "What is the pass key?", 5),
        (
            "number_string",
            "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n",
            "What is the sequence of digits?",
            10,
        ),
    ],
)
def test_needle_once_at_the_requested_depth(task, needle, question, digits, counter):
    count = 5
    examples = generate(task, 2000, count, 3, counter)
    for i, example in enumerate(examples):
        official_shape(example, i)
        assert example["input"] == question
        answer = example["answer"]
        assert isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], str)
        key = answer[0]
        assert re.fullmatch(rf"[0-9]{{{digits}}}", key)
        context = example["context"]
        line = needle.format(key=key)
        assert context.count(line) == 1
        assert context.count(key) == 2  # twice in the needle sentence, nowhere else
        # the rest is the official noise line, whole lines before and after
        before, after = context.split(line)
        assert before == NOISE * (len(before) // len(NOISE)) and after == NOISE * (len(after) // len(NOISE))
        depth = context.index(line) / (len(context) - len(line))
        assert depth == pytest.approx(i / (count - 1), abs=0.02), (i, depth)
    if task == "number_string":  # 5 digits, then 5 times one of them doubled in place: 5 adjacent repeats
        for example in examples:
            key = example["answer"][0]
            assert sum(a == b for a, b in itertools.pairwise(key)) >= 5


def test_kv_retrieval_official_shape_and_key_position(counter):
    count = 4
    examples = generate("kv_retrieval", 4000, count, 11, counter)
    for i, example in enumerate(examples):
        official_shape(example, i)
        context = example["context"]
        assert context.startswith("JSON data:\n{")
        records = json.loads(context[len("JSON data:\n") :])
        assert context == "JSON data:\n" + json.dumps(records)  # '{"k": "v", "k2": "v2"}'
        match = KV_INPUT.fullmatch(example["input"])
        assert match, example["input"]
        assert example["input"][6] == '"' and example["input"][43] == '"'  # where harnesses slice the key
        key = match.group(1)
        assert isinstance(example["answer"], str) and example["answer"] == records[key]
        assert context.count(key) == 1
        assert all(uuid.UUID(u).version == 4 for pair in records.items() for u in pair)
        assert len(set(records) | set(records.values())) == 2 * len(records)
        keys = list(records)
        assert keys.index(key) == i * len(keys) // count


def test_math_find_kinds_and_answers(counter):
    count = 7
    examples = generate("math_find", 2000, count, 5, counter)
    for i, example in enumerate(examples):
        official_shape(example, i)
        match = MATH_INPUT.fullmatch(example["input"])
        assert match, example["input"]
        kind = match.group(1)
        assert kind == MATH_KINDS[i]  # the official order, one block per kind
        # the benchmark builds the prompt's prefix from the first "The .+ of"
        found = re.findall(r"The .+ of", example["input"])
        assert found and found[0].lower()[:-3] == f"the {kind}"
        values = json.loads(example["context"])
        assert example["context"] == str(values)
        assert all(isinstance(v, int) and 0 <= v <= 99 for v in values)
        answer = example["answer"]
        assert isinstance(answer, list) and len(answer) == 1
        if kind == "median number":
            assert type(answer[0]) is float
            assert answer[0] == statistics.median(values)
        else:
            assert type(answer[0]) is int
            distinct = sorted(set(values), reverse="largest" in kind)
            rank = ["", "second ", "third "].index(kind.split("largest")[0].split("smallest")[0])
            assert answer[0] == distinct[rank]


def test_math_find_more_examples_than_kinds_come_in_blocks(counter):
    examples = generate("math_find", 1000, 14, 2, counter)
    kinds = [MATH_INPUT.fullmatch(e["input"]).group(1) for e in examples]
    assert kinds == [k for k in MATH_KINDS for _ in range(2)]


def run_chain(context: str, call: str) -> tuple[int, int]:
    """The value of ``call`` and its chain's depth, by parsing the listing (nothing is executed)."""
    assert context.startswith(CODE_HEADER)
    body = context[len(CODE_HEADER) :]
    functions = {}
    end = 0
    for match in CODE_FUNC.finditer(body):
        assert match.start() == end, body[end : end + 80]
        end = match.end()
        name, target, sign, amount = match.groups()
        add = 0 if sign is None else int(amount) * (1 if sign == "+" else -1)
        assert -12 <= add <= 17 and (sign is None or int(amount) != 0)
        functions[int(name)] = (None if target is None else int(target), add)
    assert end == len(body)
    assert list(functions) == sorted(functions)
    name, x = re.fullmatch(r"func_(\d+)\((-?\d+)\)", call).groups()
    node, value, depth = int(name), int(x), 0
    assert -10 <= value <= 10
    while node is not None:
        target, add = functions[node]
        value += add
        depth += 1
        node = target
    return value, depth


def test_code_run_answers_are_the_calls_values(counter):
    count = 5
    examples = generate("code_run", 3000, count, 9, counter)
    for i, example in enumerate(examples):
        official_shape(example, i)
        calls = CODE_CALL.findall(example["input"])
        assert calls, example["input"]
        assert example["input"] == (
            f"Please give me the exact number of the return value of {calls[0]}. "
            "Your response should end with the sentence 'The return value is:'."
        )
        value, depth = run_chain(example["context"], calls[0])
        assert depth == CODE_DEPTHS[i]
        answer = example["answer"]
        assert isinstance(answer, list) and len(answer) == 1 and type(answer[0]) is int
        assert answer[0] == value


def test_same_seed_same_files_other_seed_differs(counter, tmp_path):
    for task in SYNTHETIC_TASKS:
        length = LENGTHS[task]
        paths = []
        for name, seed in (("a", 1), ("b", 1), ("c", 2)):
            path = tmp_path / name / f"{task}.jsonl"
            write_jsonl(generate(task, length, 3, seed, counter), path)
            paths.append(path)
        a, b, c = (p.read_bytes() for p in paths)
        assert a == b, task
        assert a != c, task
        lines = a.decode("utf-8").splitlines()
        assert len(lines) == 3 and [list(json.loads(line)) for line in lines] == [FIELDS] * 3


def test_write_jsonl_official_lines_atomic(tmp_path):
    path = tmp_path / "passkey.jsonl"
    examples = [
        {"id": 0, "context": "草 is green.\n", "input": "What is the pass key?", "answer": ["01234"], "options": []},
        {"id": 1, "context": "x", "input": "y", "answer": [1.5], "options": []},
    ]
    write_jsonl(examples, path)
    raw = path.read_bytes()
    assert raw == ("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode("utf-8"))
    assert "草".encode() in raw  # not \u-escaped
    assert [json.loads(line) for line in raw.decode("utf-8").splitlines()] == examples
    # a failed write leaves the old file as it was and no temporary file behind
    with pytest.raises(TypeError):
        write_jsonl([examples[0], {"id": 2, "context": object()}], str(path))
    assert path.read_bytes() == raw
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passkey.jsonl"]
    # a successful one replaces it
    write_jsonl(examples[:1], path)
    assert path.read_bytes().decode("utf-8").count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passkey.jsonl"]


def chars(task: str, example: dict) -> int:
    """A tokenizer-free count for argument checks: one token per 4 characters."""
    return (len(example["context"]) + len(example["input"])) // 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "longbook_qa_eng"}, "unknown synthetic task 'longbook_qa_eng'"),
        ({"task": "Passkey"}, "unknown synthetic task"),
        ({"count": 0}, "count must be a positive integer"),
        ({"count": -3}, "count must be a positive integer"),
        ({"length": 0}, "length must be a positive"),
        ({"length": 5}, "length 5 is too small for passkey"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = {"task": "passkey", "length": 1000, "count": 2, "seed": 0, "count_tokens": chars} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(**args)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_too_small_length_names_the_task(task):
    with pytest.raises(ValueError, match=rf"length 3 is too small for {task}"):
        generate(task, 3, 1, 0, chars)


def test_one_example_sits_mid_haystack():
    (example,) = generate("passkey", 2000, 1, 0, chars)
    depth = example["context"].index("The pass key is") / len(example["context"])
    assert depth == pytest.approx(0.5, abs=0.02)
