"""InfiniteBench prompts: the benchmark's templates, verbatim, and its middle truncation.

Contract:

* ``load_task(data_dir, task)`` reads ``<task>.jsonl`` (the official files) with JSON types kept,
  and names the file and line of anything malformed.
* ``fill(task, example, style)`` is the prompt text of one example: ``style="chat"`` uses the
  chat-style ("gpt4") templates, meant as one user turn in the model's chat template;
  ``style="completion"`` the completion-style templates (``yarn_mistral_templates``), fed as raw
  text, as the benchmark ran open models.
* ``truncate_middle(tokenizer, text, budget)`` keeps the first ``budget // 2`` and the last
  ``budget - budget // 2`` tokens when the text is longer than ``budget`` tokens (the middle goes),
  decoded with special tokens skipped, and guarantees the result re-encodes to at most ``budget``.
* ``build_items`` turns examples into :class:`~minicpm.eval.harness.Item` s: each prompt, chat
  wrapper included, plus its task's answer length fits ``max_length`` tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .harness import Item
from .scoring import INFINITEBENCH_TASKS, MAX_NEW_TOKENS, ground_truth, infinitebench_averages, score_infinitebench

STYLES = ("chat", "completion")

CHAT_TEMPLATES = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n\n{context}\n\n{input}",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. "
    "I will quiz you about the important information there.\n\n{context}\n\n{input}",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below."
    "\n\n{context}\n\n{input}",
    "longbook_qa_eng": "Read the book below and answer a question.\n\n{context}\n\nQuestion: {question}"
    "\n\nBe very concise.",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n\n"
    "Only one of the following options is correct, tell me the answer using one single letter (A, B, C, or D). "
    "Don't say anything else.\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}",
    "longbook_sum_eng": "Summarize the following book.\n\n{context}",
    "longbook_qa_chn": "请根据以下书籍回答我的问题。\n\n{context}\n\n问题：{question}\n请尽量简短地回答。",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": "Compute the intermediate values in the following long expression.\n\n{context}",
    "code_run": "Following is a set of Python functions. There is a function called named {func}.\n\n{context}\n\n"
    "Please give me the exact number of the return value of {func_call}. Be concise. "
    "Your response must end with the final returned value.",
    "code_debug": "There is ONLY ONE function in the large project that is deliberately made to include an obvious "
    "error. Please find the function that contains the most obvious errors. I will give you four options to "
    "narrow your scope. You can inspect the options and think. Eventually, tell me the answer using one single "
    "letter (A, B, C, or D).\n\n{context}\n\nWhich funtion has deliberate error?\nA. {OPTION_A}\nB. {OPTION_B}\n"
    "C. {OPTION_C}\nD. {OPTION_D}\n\nYou should first find the functions in the options. Repeat their content, "
    "inspect through code, and at last give me your answer for the function that has the deliberate and "
    "obvious error in A, B, C, or D.",
    "longdialogue_qa_eng": "Below is a dialogue script where one random occurrence of a character name is "
    'replaced with "$$MASK$$", and you should try to guess who that character is.\n\nThe dialogue:\n\n---\n\n'
    '{context}\n\n---\n\nEnd of dialogue.\n\nWhich character is most likely "$$MASK$$"? Just say the name used '
    "by the scriptwriter (before the colon marks) of one single character and nothing else.",
}

COMPLETION_TEMPLATES = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. "
    "I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below."
    "\n\n{context}\n\n{input}",
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n"
    "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is",
    "longbook_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
    "Question: {question}\nAnswer:",
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\n"
    "Values: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:",
    "code_run": "There is a function called {func} in the following Python code.\n\n{context}\n\n"
    "Please compute the exact value of {func_call}. The value of {func_call} is",
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a deliberate error "
    "that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}"
    "\n\nThe correct option is:",
    "longdialogue_qa_eng": "Below is a dialogue script where one random occurrence of a character name is "
    'replaced with "$$MASK$$", and you should try to guess who that character is.\n\n{context}\n\n'
    "The name that has been replaced with $$MASK$$ is likely",
}


def check_tasks(tasks: Sequence[str]) -> list[str]:
    unknown = [t for t in tasks if t not in INFINITEBENCH_TASKS]
    if unknown:
        raise UserError(f"unknown InfiniteBench task(s) {', '.join(unknown)}; known: {', '.join(INFINITEBENCH_TASKS)}")
    return list(dict.fromkeys(tasks))


def load_task(data_dir: str | Path, task: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The examples of ``<data_dir>/<task>.jsonl`` in file order (at most ``limit``)."""
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no such file (InfiniteBench data: one <task>.jsonl per task)")
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(examples) >= limit:
                break
            try:
                example = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(example, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
            missing = [k for k in ("context", "input", "answer") if k not in example]
            if missing:
                raise UserError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            example.setdefault("id", len(examples))
            example.setdefault("options", [])
            examples.append(example)
    return examples


def fill(task: str, example: dict[str, Any], style: str = "chat") -> str:
    """The benchmark's prompt for ``example`` (the whole context, before truncation)."""
    if style not in STYLES:
        raise UserError(f"unknown prompt style {style!r}; use chat or completion")
    template = (CHAT_TEMPLATES if style == "chat" else COMPLETION_TEMPLATES)[task]
    fields: dict[str, Any] = {"context": example["context"], "input": example["input"], "question": example["input"]}
    if task in ("longbook_choice_eng", "code_debug"):
        options = list(example.get("options") or [])
        if len(options) < 4:
            raise UserError(f"{task} example {example.get('id')!r}: needs 4 options, has {len(options)}")
        fields.update({f"OPTION_{letter}": options[i] for i, letter in enumerate("ABCD")})
    elif task == "math_find":
        found = re.search(r"The .+ of", example["input"])
        if found is None:
            raise UserError(f"math_find example {example.get('id')!r}: its input has no 'The ... of' question")
        fields["prefix"] = f"What is {found.group(0).lower()[:-3]} in the following list?"
    elif task == "code_run":
        found = re.search(r"func_[0-9]+\(\-?[0-9]+\)", example["input"])
        if found is None:
            raise UserError(f"code_run example {example.get('id')!r}: its input has no func_N(x) call")
        fields["func_call"] = found.group(0)
        fields["func"] = found.group(0).split("(")[0]
    return template.format(**fields)


def truncate_middle(tokenizer: Any, text: str, budget: int) -> tuple[str, int]:
    """``text`` cut to at most ``budget`` tokens by removing its middle; returns the text and its
    token count (without special tokens)."""
    if budget < 2:
        raise UserError(f"the truncation budget is {budget} tokens: raise --max-length")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= budget:
        return text, len(ids)
    keep = budget
    while True:  # decoding and re-encoding can merge or split tokens at the cut: shrink until it fits
        cut = tokenizer.decode(ids[: keep // 2] + ids[len(ids) - (keep - keep // 2) :], skip_special_tokens=True)
        n = len(tokenizer.encode(cut, add_special_tokens=False))
        if n <= budget:
            return cut, n
        keep -= n - budget


def answer_room(task: str, max_length: int) -> int:
    """New tokens reserved for ``task``'s answer: its limit, at most half the context (math_calc
    asks 30000, which would leave a small model no prompt)."""
    return min(MAX_NEW_TOKENS[task], max_length // 2)


def build_items(
    tokenizer: Any,
    data_dir: str | Path,
    tasks: Sequence[str],
    style: str,
    max_length: int,
    limit: int | None = None,
    chat_format: str = "auto",
) -> list[Item]:
    """The work list, in task order then file order: each prompt (chat wrapper included) fits
    ``max_length`` minus its task's answer room."""
    items: list[Item] = []
    overhead = 0
    if style == "chat":  # tokens the chat template adds around the user turn
        overhead = len(tokenizer.encode_chat([{"role": "user", "content": ""}], chat_format=chat_format))
    else:
        overhead = len(tokenizer.encode("", add_special_tokens=True))
    for task in check_tasks(tasks):
        room = answer_room(task, max_length)
        for example in load_task(data_dir, task, limit):
            prompt, budget = fill(task, example, style), max_length - room - overhead
            while True:  # the wrapper's tokens can merge with the text's at the seams: re-check the total
                text, _ = truncate_middle(tokenizer, prompt, budget)
                if style == "chat":
                    messages: list[dict[str, str]] | None = [{"role": "user", "content": text}]
                    ids = tokenizer.encode_chat(messages, chat_format=chat_format)
                else:
                    messages, ids = None, tokenizer.encode(text, add_special_tokens=True)
                if len(ids) + room <= max_length:
                    break
                budget -= len(ids) + room - max_length
            items.append(
                Item(
                    index=len(items),
                    group=task,
                    id=example["id"],
                    prompt_ids=ids,
                    messages=messages,
                    max_new_tokens=room,
                    ground_truth=ground_truth(task, example),
                    meta={"task": task},
                )
            )
    return items


def build(args: Any, tokenizer: Any, context: int) -> tuple[list[Item], dict[str, Any], Any, Any]:
    """The suite for ``minicpm eval infinitebench``: (items, settings, score, report)."""
    tasks = check_tasks(args.tasks or INFINITEBENCH_TASKS)
    max_length = args.max_length or context
    items = build_items(tokenizer, args.data, tasks, args.style, max_length, args.limit, args.chat_format)
    settings = {
        "style": args.style,
        "max_length": max_length,
        "tasks": tasks,
        "limit": args.limit,
        "data": str(Path(args.data).resolve()),
        "max_new_tokens": {t: answer_room(t, max_length) for t in tasks},
        "decoding": "greedy",
    }
    return items, settings, score_item, report


def score_item(item: Item, prediction: str, model: str = "") -> float:
    return score_infinitebench(item.group, prediction, item.ground_truth, model)


def report(records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Per-task scores (x100) and the two averages, as JSON and as the card's markdown table."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["group"], []).append(r)
    tasks = [t for t in INFINITEBENCH_TASKS if t in by_task]
    scores = {t: 100 * sum(r["score"] for r in by_task[t]) / len(by_task[t]) for t in tasks}
    averages = infinitebench_averages({t: s for t, s in scores.items()})
    per_task = {
        t: {
            "score": scores[t],
            "n": len(by_task[t]),
            "mean_prompt_tokens": sum(r["prompt_tokens"] for r in by_task[t]) / len(by_task[t]),
            "max_new_tokens": (settings.get("max_new_tokens") or {}).get(t),
            # answers that ran into the benchmark's answer limit (finish "length"): scored as they stand
            "cut_by_limit": sum(r.get("finish_reason") == "length" for r in by_task[t]),
        }
        for t in tasks
    }
    flat = {"avg": averages["avg"], "avg w/o code&math": averages["avg_wo_code_math"], **scores}
    data = {"suite": "infinitebench", "settings": settings, "tasks": per_task, "scores": flat}
    columns = ["avg", "avg w/o code&math", *tasks]
    head = [_short(c) for c in columns]
    row = ["-" if flat[c] is None else f"{flat[c]:.2f}" for c in columns]
    md = [
        f"# InfiniteBench: {settings.get('model_name', 'model')}",
        "",
        f"Prompt style `{settings.get('style')}`, budget {settings.get('max_length')} tokens (middle truncation), "
        f"greedy; {sum(len(v) for v in by_task.values())} prompts; wall time {settings.get('wall_time_s', 0):.0f} s; "
        f"targets: {', '.join(settings.get('targets') or [])}.",
        "",
        "| model | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
        f"| {settings.get('model_name', 'model')} | " + " | ".join(row) + " |",
        "",
        "| task | examples | mean prompt tokens | answer limit (tokens) | answers cut at the limit | score |",
        "|---|---|---|---|---|---|",
        *(
            f"| {t} | {per_task[t]['n']} | {per_task[t]['mean_prompt_tokens']:.0f} | "
            f"{per_task[t]['max_new_tokens'] or '-'} | {per_task[t]['cut_by_limit']} | {scores[t]:.2f} |"
            for t in tasks
        ),
    ]
    cut = [t for t in tasks if per_task[t]["cut_by_limit"]]
    if cut:
        md += [
            "",
            "Answers cut at the benchmark's answer limit (finish `length`), scored as they stand, as the "
            "benchmark does: "
            + ", ".join(f"{t} {per_task[t]['cut_by_limit']} of {per_task[t]['n']}" for t in cut)
            + ".",
        ]
        if settings.get("style") == "chat":
            md[-1] += (
                ' In chat style a model may spend the limit on a preamble ("The pass key is ...") before the '
                "answer; `--style completion` prompts end where the answer begins."
            )
    if len(tasks) < len(INFINITEBENCH_TASKS):
        md += ["", "Averages need all 12 tasks (the first 8 for avg w/o code&math): '-' marks a missing one."]
    return data, "\n".join(md) + "\n"


def _short(task: str) -> str:
    return {
        "number_string": "number_string",
        "kv_retrieval": "kv",
        "longbook_choice_eng": "choice",
        "longbook_qa_chn": "qa_chn",
        "longbook_qa_eng": "qa_eng",
        "longbook_sum_eng": "sum",
        "longdialogue_qa_eng": "dialogue",
    }.get(task, task)
