"""Scoring rules of minicpm.eval.scoring: InfiniteBench per task, its averages, RULER and the needle score.

Hand-made cases, one or more per clause of each rule (InfiniteBench's ``src/compute_scores.py``,
RULER's ``scripts/eval/evaluate.py``), including the places where the benchmark's code is followed over a plain reading.
"""

from __future__ import annotations

import math

import pytest

from minicpm.eval.scoring import (
    INFINITEBENCH_TASKS,
    MAX_NEW_TOKENS,
    WITHOUT_CODE_MATH,
    ground_truth,
    infinitebench_averages,
    match_all,
    match_part,
    needle_score,
    ruler_postprocess,
    score_infinitebench,
    string_match_all,
    string_match_part,
)


def score(task: str, prediction: str, label, model: str = "") -> float:
    return score_infinitebench(task, prediction, label, model)


# ---------------------------------------------------------------------------------------------------------
# Tasks, limits, labels
# ---------------------------------------------------------------------------------------------------------


def test_tasks_in_card_order_and_limits():
    assert INFINITEBENCH_TASKS == (
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
    assert INFINITEBENCH_TASKS[:8] == WITHOUT_CODE_MATH
    assert MAX_NEW_TOKENS == {
        "passkey": 6,
        "number_string": 12,
        "kv_retrieval": 50,
        "longbook_sum_eng": 1200,
        "longbook_choice_eng": 40,
        "longbook_qa_eng": 40,
        "longbook_qa_chn": 40,
        "longdialogue_qa_eng": 40,
        "math_find": 3,
        "math_calc": 30000,
        "code_run": 5,
        "code_debug": 5,
    }


OPTIONS = ["Snowfield", "Walking Georgie", "Hall Farm", "Rivers"]


@pytest.mark.parametrize("task", ["longbook_choice_eng", "code_debug"])
def test_ground_truth_choice_letter_by_index(task):
    assert ground_truth(task, {"answer": "Hall Farm", "options": OPTIONS}) == ["Hall Farm", "C"]
    assert ground_truth(task, {"answer": ["Snowfield"], "options": OPTIONS}) == ["Snowfield", "A"]
    # An answer already given as [text, letter] is kept, even without options.
    assert ground_truth(task, {"answer": ["Anything", "D"], "options": []}) == ["Anything", "D"]


@pytest.mark.parametrize(
    ("example", "problem"),
    [
        ({"answer": "Nowhere", "options": OPTIONS}, "not among the options"),
        ({"answer": ["Nowhere"], "options": OPTIONS}, "not among the options"),
        ({"answer": ["a", "b", "c"], "options": OPTIONS}, "answer must be"),
        ({"answer": ["Snowfield", "E"], "options": OPTIONS}, "answer must be"),
        ({"answer": 3, "options": OPTIONS}, "answer must be"),
        ({"answer": "Snowfield"}, "no 'options'"),
        ({"answer": "e", "options": ["a", "b", "c", "d", "e"]}, "only A-D"),
        ({"options": OPTIONS}, "no 'answer'"),
    ],
)
def test_ground_truth_choice_malformed(example, problem):
    with pytest.raises(ValueError, match=problem) as info:
        ground_truth("longbook_choice_eng", example)
    assert "longbook_choice_eng" in str(info.value)


def test_ground_truth_keeps_loaded_types():
    cases = {
        "passkey": ["71432"],
        "number_string": ["3000077442"],
        "kv_retrieval": "c14cb8ba-002b-43be-bdc7-8a83f0fe1ac8",
        "longbook_qa_eng": ["stockings", "a stocking"],
        "longbook_qa_chn": ["胡一刀, 马行空"],
        "longbook_sum_eng": ["A summary."],
        "longdialogue_qa_eng": ["ACE", "ACE ROTHSTEIN"],
        "math_calc": [[79, 59, 73]],
        "math_find": [48.0],
        "code_run": [4],
    }
    for task, answer in cases.items():
        label = ground_truth(task, {"id": 0, "context": "", "input": "", "answer": answer, "options": []})
        assert label is answer, task
    assert type(ground_truth("math_find", {"answer": [48.0]})[0]) is float
    assert type(ground_truth("math_find", {"answer": [48]})[0]) is int


@pytest.mark.parametrize(
    ("task", "answer"),
    [
        ("math_calc", []),
        ("math_calc", [["x"]]),
        ("math_find", ["48"]),
        ("code_run", ["4"]),
        ("passkey", []),
        ("kv_retrieval", ["c14c"]),
        ("longdialogue_qa_eng", "ACE"),
        ("longbook_qa_eng", [1]),
    ],
)
def test_ground_truth_malformed_label(task, answer):
    with pytest.raises(ValueError, match=task):
        ground_truth(task, {"answer": answer})


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"passkey.*code_run"):
        score("passkey_v2", "1", ["1"])
    with pytest.raises(ValueError, match="known tasks"):
        ground_truth("nope", {"answer": 1})


# ---------------------------------------------------------------------------------------------------------
# passkey / number_string / kv_retrieval / longdialogue_qa_eng / code_run
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("The pass key is 71432.", 1.0),
        ("71432 or maybe 12345", 1.0),
        ("12345, no: 71432", 0.0),  # only the first run of digits counts
        ("7143-2", 0.0),
        ("714321", 0.0),
        ("The pass key is", 0.0),
        ("", 0.0),
    ],
)
def test_passkey(prediction, expected):
    assert score("passkey", prediction, ["71432"]) == expected


def test_passkey_label_forms_and_number_string():
    assert score("passkey", "71432", "71432") == 1.0  # flat label, as in the benchmark's older files
    assert score("passkey", "2", ["1", "2"]) == 0.0  # compared with the first element only
    assert score("number_string", "The sequence of digits is 3000077442.", ["3000077442"]) == 1.0
    assert score("number_string", "300007744", ["3000077442"]) == 0.0


KEY = "c14cb8ba-002b-43be-bdc7-8a83f0fe1ac8"


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (f'The value is: "{KEY}"', 1.0),
        (f"{{'key': '{KEY}'}}", 1.0),
        (f"{KEY}.", 1.0),
        (f"value:{KEY}!", 1.0),
        (f"Is it {KEY}?\n", 1.0),
        (f"{KEY};", 0.0),  # ";" is not one of the separators
        (f"({KEY})", 0.0),
        (f"{KEY}x", 0.0),
        (KEY.upper(), 0.0),  # case-sensitive
        ("", 0.0),
    ],
)
def test_kv_retrieval(prediction, expected):
    assert score("kv_retrieval", prediction, KEY) == expected


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("Ace Rothstein", ["ACE", "ACE ROTHSTEIN"], 1.0),
        ("ace: hello", ["ACE"], 1.0),
        ('"Ace."', ["ACE"], 1.0),
        ("Aces", ["ACE"], 0.0),
        ("Nicky Santoro", ["ACE", "NICKY"], 0.0),  # only answer[0] counts
        ("Remo", ["Remo"], 0.0),  # words are upper-cased, the label is not
        ("", ["ACE"], 0.0),
    ],
)
def test_longdialogue(prediction, label, expected):
    assert score("longdialogue_qa_eng", prediction, label) == expected


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("The return value is 4.", [4], 1.0),
        ("result: `4`", [4], 1.0),
        ("It returns '-3'", [-3], 1.0),
        ("  4\n", 4, 1.0),  # flat int label
        ("4 is the answer", [4], 0.0),  # the last word decides
        ("4,", [4], 0.0),  # "," is not a separator: int("4,") fails
        ("5", [4], 0.0),
        ("", [4], 0.0),
    ],
)
def test_code_run(prediction, label, expected):
    assert score("code_run", prediction, label) == expected


# ---------------------------------------------------------------------------------------------------------
# math_find / math_calc
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("48.", [48], 1.0),
        ("The answer is 48", [48], 1.0),
        ("4 8", [48], 0.0),  # the first number only
        ("48.5", [48], 0.0),  # int label: a decimal is wrong (the benchmark's int() would raise)
        ("48", [48.0], 1.0),  # float median label: compared as float
        ("48.00", [48.0], 1.0),
        ("48.5", [48.5], 1.0),
        ("48", [48.5], 0.0),
        ("88", 88, 1.0),  # flat label
        ("no number", [48], 0.0),
        ("-48", [-48], 0.0),  # no sign in the pattern
    ],
)
def test_math_find(prediction, label, expected):
    assert score("math_find", prediction, label) == expected


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        ("[1, 2, 3, 4]", [[1, 2, 3, 4]], 1.0),
        ("1 -2 3 -4", [[1, 2, 3, 4]], 1.0),  # signs are ignored in the prediction
        ("1, -2, 3", [[1, -2, 3]], 1 / 3),  # ... so a negative label value never matches
        ("1 9 3 4", [[1, 2, 3, 4]], 0.25),  # stops at the first mismatch
        ("1 2", [[1, 2, 3, 4]], 0.5),  # divides by the label length
        ("1 2 3 4 5 6", [[1, 2, 3, 4]], 1.0),
        ("x1y2z3", [1, 2, 3], 1.0),  # flat label list
        ("none", [[1, 2]], 0.0),
        ("7 1 2", [[1, 2]], 0.0),
    ],
)
def test_math_calc(prediction, label, expected):
    assert score("math_calc", prediction, label) == pytest.approx(expected)


def test_math_calc_gpt4_drops_first_number():
    label = [[1, 2, 3]]
    assert score("math_calc", "5 1 2 3", label, model="gpt4") == 1.0
    assert score("math_calc", "5 1 2 3", label) == 0.0
    assert score("math_calc", "5 1 2 3", label, model="gpt-4") == 0.0  # the benchmark's name is exactly "gpt4"
    assert score("math_calc", "1 2 3", label, model="gpt4") == 0.0


# ---------------------------------------------------------------------------------------------------------
# longbook_choice_eng
# ---------------------------------------------------------------------------------------------------------

CHOICE = ["Walking Georgie", "B"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # empty
        ("", 0.0),
        ("   \n", 0.0),
        # the first character is one of ABCD: it alone decides
        ("B", 1.0),
        ("  B. Walking Georgie", 1.0),
        ("A", 0.0),
        ("Answer: B", 0.0),  # "A" of "Answer" decides
        ("C is wrong, B is right", 0.0),
        # the whole prediction equals an element of the label (list membership, not substring)
        ("Walking Georgie", 1.0),
        ("Walking", 0.0),
        # prefixes, in order: "answer is:", "answer:", "answer is", "option is"
        ("The answer is: B", 1.0),
        ("the answer is: Walking Georgie, I think", 1.0),
        ("my answer: B", 1.0),
        ("the answer is B", 1.0),
        ("the correct option is B", 1.0),
        ("the answer is: C, final answer: B", 0.0),  # "answer is:" comes before "answer:"
        ("the answer is: B, final answer: C", 1.0),
        ("the answer: C, the option is B", 0.0),  # "answer:" comes before "option is"
        ('the answer is "B"', 1.0),  # quotes become spaces, double spaces are squeezed
        ("the answer is\nB", 1.0),
        ("the answer is (B)", 0.0),  # the text after the prefix must start with a label string
        ("the answer is:B", 0.0),  # one character after the prefix is skipped
        ("I say B, so the answer is:", 0.0),  # prefix with nothing after it: wrong, no fallback
        ("The ANSWER: B", 1.0),  # no prefix (case-sensitive): the first bare letter word decides
        # no prefix: the first word that is a letter decides
        ("I pick B here", 1.0),
        ("I pick C, not B", 0.0),
        ("I choose (B)", 0.0),
        ("I pick AB or B", 0.0),  # the benchmark's `word in "ABCD"`: "AB" stops the search
        ("no letter here", 0.0),
    ],
)
def test_longbook_choice(prediction, expected):
    assert score("longbook_choice_eng", prediction, CHOICE) == expected


def test_choice_label_must_be_a_pair():
    with pytest.raises(ValueError, match="pair"):
        score("longbook_choice_eng", "B", "B")


# ---------------------------------------------------------------------------------------------------------
# code_debug
# ---------------------------------------------------------------------------------------------------------

DEBUG = ["Configer._set_option", "A"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("A", 0.0),  # a bare letter scores 0
        ("A.", 1.0),
        ("A:", 1.0),
        (" A. Configer._set_option", 1.0),
        ("A)", 0.0),
        ("B:", 0.0),
        ("B. Configer._set_option", 0.0),
        ("", 0.0),
        # prefixes, in order: "answer is:", "is:", "answer:", "correct option is:"
        ("The answer is: A", 1.0),
        ("The function with the error is: Configer._set_option", 0.0),  # "option" is removed from the name too
        ("my answer: A", 1.0),
        ("my answer: B; the buggy one is: A", 1.0),  # "is:" comes before "answer:"
        ("my answer: A; the buggy one is: B", 0.0),
        ("The correct answer is: Option A", 1.0),  # the word "Option" is removed
        ("The answer is: **A**", 1.0),  # "*" removed, spaces squeezed
        ("The answer is:\nA", 1.0),
        ("The answer is:A", 0.0),  # one character after the prefix is skipped
        ("The answer is:", 0.0),
        ("The answer is A", 0.0),  # "answer is" without a colon is not a prefix here
        ("I believe A is wrong", 0.0),  # no prefix: wrong
    ],
)
def test_code_debug(prediction, expected):
    assert score("code_debug", prediction, DEBUG) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("The buggy function is: parse_args", 1.0),  # the function name after the prefix
        ("The answer is: `parse_args`", 1.0),  # backticks removed
        ("The answer is: C. parse_args", 1.0),
        ("The answer is: parse", 0.0),
        ("The answer is: B", 0.0),
    ],
)
def test_code_debug_function_name(prediction, expected):
    assert score("code_debug", prediction, ["parse_args", "C"]) == expected


# ---------------------------------------------------------------------------------------------------------
# longbook_qa_eng / longbook_qa_chn
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The Cat!", ["a cat"], 1.0),  # case, punctuation, articles
        ("an apple", ["Apple"], 1.0),
        ("another apple", ["apple"], 2 / 3),  # "another" is not an article
        ("U.S.A.", ["USA"], 1.0),
        ("the big cat", ["cat"], 2 / 3),  # precision 1/2, recall 1
        ("cat", ["big black cat"], 0.5),  # precision 1, recall 1/3
        ("cat cat", ["cat"], 2 / 3),  # counts are clipped: precision 1/2
        ("big cat", ["dog", "big cat", "cat"], 1.0),  # max over the answers
        ("dog", ["cat"], 0.0),
        ("", ["cat"], 0.0),
        ("the", ["a"], 0.0),  # both empty after normalisation
    ],
)
def test_longbook_qa_eng(prediction, answers, expected):
    assert score("longbook_qa_eng", prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("田归农，商老太。", ["田归农, 商老太"], 1.0),  # Chinese and ASCII punctuation, whitespace removed
        ("田归农 商老太！", ["田归农、商老太"], 1.0),
        ("“田归农”", ["田归农"], 1.0),
        ("田归农", ["田归农, 商老太"], 2 / 3),  # precision 1, recall 1/2
        ("ABC", ["abc"], 1.0),  # lower-cased
        ("《红楼梦》", ["红楼梦"], 6 / 7),  # the benchmark's list lacks the opening title mark
        ("商老太", ["胡一刀", "商老太"], 1.0),  # max over the answers
        ("胡", ["商老太"], 0.0),
        ("", ["商老太"], 0.0),
    ],
)
def test_longbook_qa_chn(prediction, answers, expected):
    assert score("longbook_qa_chn", prediction, answers) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------
# longbook_sum_eng: ROUGE-Lsum F-measure (expected values from hand-computed LCS)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "label", "expected"),
    [
        # LCS(the cat sat on the mat, the cat lay on a mat) = the cat on mat: P = R = 4/6
        ("the cat lay on a mat", ["the cat sat on the mat"], 2 / 3),
        ("the cat lay on a mat", "the cat sat on the mat", 2 / 3),  # a plain string reference
        # the reference with the best F-measure counts
        ("the cat lay on a mat", ["zebra", "the cat sat on the mat"], 2 / 3),
        # sentences are split on newlines: the union LCS over prediction sentences finds both words ...
        ("beta\nalpha", ["alpha beta"], 1.0),
        # ... while on one line the LCS is one word: P = R = 1/2
        ("beta alpha", ["alpha beta"], 0.5),
        # two reference sentences: unions {a, c} and {d, e}, 4 hits over 5 tokens each side
        ("a c\nd x e", ["a b c\nd e"], 0.8),
        ("The CAT, sat!", ["the cat sat"], 1.0),  # lower-cased, punctuation dropped
        ("cat run", ["cats running"], 0.0),  # no stemmer
        ("", ["the cat sat"], 0.0),
    ],
)
def test_longbook_sum_rouge_lsum(prediction, label, expected):
    assert score("longbook_sum_eng", prediction, label) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------
# Averages
# ---------------------------------------------------------------------------------------------------------


def test_averages_all_tasks():
    scores = {task: float(i) for i, task in enumerate(INFINITEBENCH_TASKS)}  # 0..11
    result = infinitebench_averages(scores)
    assert result["avg"] == pytest.approx(5.5)
    assert result["avg_wo_code_math"] == pytest.approx(3.5)


def test_averages_card_row():
    card = {
        "passkey": 98.31,
        "number_string": 99.83,
        "kv_retrieval": 9,
        "longbook_choice_eng": 29.69,
        "longbook_qa_chn": 23.06,
        "longbook_qa_eng": 16.33,
        "longbook_sum_eng": 15.73,
        "longdialogue_qa_eng": 9.5,
        "math_calc": 0,
        "math_find": 4.29,
        "code_debug": 22.08,
        "code_run": 0,
    }
    result = infinitebench_averages(card)
    assert round(result["avg"], 2) == 27.32
    assert round(result["avg_wo_code_math"], 2) == 37.68


def test_averages_missing_tasks():
    scores = {task: 1.0 for task in WITHOUT_CODE_MATH}
    assert infinitebench_averages(scores) == {"avg": None, "avg_wo_code_math": 1.0}
    scores["extra"] = 50.0  # keys that are not tasks are ignored
    assert infinitebench_averages(scores)["avg_wo_code_math"] == 1.0
    del scores["passkey"]
    assert infinitebench_averages(scores) == {"avg": None, "avg_wo_code_math": None}
    assert infinitebench_averages({}) == {"avg": None, "avg_wo_code_math": None}


# ---------------------------------------------------------------------------------------------------------
# RULER
# ---------------------------------------------------------------------------------------------------------


def test_ruler_per_sample():
    refs = ["1234567", "7654321"]
    assert match_all("The numbers are 1234567 and 7654321.", refs) == 1.0
    assert match_all("The number is 1234567.", refs) == 0.5
    assert match_part("The number is 1234567.", refs) == 1.0
    assert match_all("nothing", refs) == 0.0
    assert match_part("nothing", refs) == 0.0
    assert match_all("Quick-FOX", ["quick-fox"]) == 1.0  # case-insensitive both ways
    assert match_all("quick-fox", ["QUICK-fox"]) == 1.0


def test_ruler_postprocess_control_chars():
    assert ruler_postprocess("  a\tb\x00c\r\n ") == "a\nb\nc"
    assert match_all("alpha\tbeta", ["alpha\nbeta"]) == 1.0  # the tab became a newline
    assert match_all("alpha\tbeta", ["alpha\tbeta"]) == 0.0


def test_ruler_aggregates_and_rounding():
    preds = ["a b", "a", "x"]
    refs = [["a", "b"], ["a", "b"], ["a", "b"]]
    assert string_match_all(preds, refs) == 50.0  # (1 + 0.5 + 0) / 3
    assert string_match_part(preds, refs) == 66.67  # (1 + 1 + 0) / 3 = 66.666...
    assert string_match_all(["a", "x", "x"], [["a"], ["a"], ["a"]]) == 33.33
    assert string_match_all(["a b c", "x", "x"], [["a", "b", "c"], ["a"], ["a", "b", "c"]]) == 33.33
    assert string_match_all(["abc"], [["A", "B", "Z"]]) == 66.67
    assert string_match_part(["ABC"], [["z", "c"]]) == 100.0


def test_ruler_errors():
    with pytest.raises(ValueError):
        string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        string_match_part([], [])
    with pytest.raises(ValueError):
        match_all("a", [])
    with pytest.raises(TypeError):
        match_part("a", "a")


# ---------------------------------------------------------------------------------------------------------
# Needle
# ---------------------------------------------------------------------------------------------------------


def test_needle_score():
    facts = ["sandwich", "Dolores Park"]
    assert needle_score("Eat a SANDWICH and sit in dolores park on a sunny day.", facts) == 1.0
    assert needle_score("Eat a sandwich.", facts) == 0.5
    assert needle_score("Visit the Golden Gate Bridge.", facts) == 0.0
    assert math.isclose(needle_score("a b", ["a", "b", "c"]), 2 / 3)
    with pytest.raises(ValueError):
        needle_score("x", [])
