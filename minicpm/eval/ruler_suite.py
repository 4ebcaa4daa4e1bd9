"""RULER as a harness suite: samples for each (task, length), the prompt as the model's chat
wrapping of the template followed by the answer prefix (a raw prompt, sent as token ids), and the
report as RULER's table of tasks x lengths with the per-length average and the effective length.

Contract: ``build(args, tokenizer, context)`` returns ``(items, settings, score, report)`` like the
other suites; lengths above the model's context are refused; the same seed gives the same items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import UserError
from . import ruler
from .harness import Item


def build(args: Any, tokenizer: Any, context: int) -> tuple[list[Item], dict[str, Any], Any, Any]:
    tasks = list(dict.fromkeys(args.tasks or ruler.RULER_TASKS))
    known = (*ruler.RULER_TASKS, *ruler.QA_TASKS)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"unknown RULER task(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if any(t in ruler.QA_TASKS for t in tasks) and not args.qa_file:
        raise UserError("qa_1 needs --qa-file with SQuAD v2's dev JSON, qa_2 HotpotQA's")
    lengths = sorted(set(args.lengths))
    over = [n for n in lengths if n > context]
    if over:
        raise UserError(f"length(s) {over} exceed the model's context ({context} tokens)")

    def prompt(user: str, prefix: str) -> list[int]:
        return tokenizer.encode_chat(
            [{"role": "user", "content": user}], chat_format=args.chat_format, assistant_prefix=prefix
        )

    def count_tokens(user: str, prefix: str) -> int:
        return len(prompt(user, prefix))

    items = []
    for task in tasks:
        for length in lengths:
            for sample in ruler.generate(task, length, args.samples, args.seed, count_tokens, qa_file=args.qa_file):
                items.append(
                    Item(
                        index=len(items),
                        group=f"{task}-{length}",
                        id=sample["index"],
                        prompt_ids=prompt(sample["input"], sample["answer_prefix"]),
                        messages=None,
                        max_new_tokens=sample["max_new_tokens"],
                        ground_truth=list(sample["outputs"]),
                        meta={"task": task, "length": length},
                    )
                )
    settings = {
        "tasks": tasks,
        "lengths": lengths,
        "samples": args.samples,
        "seed": args.seed,
        "qa_file": args.qa_file,
        "decoding": "greedy",
    }
    return items, settings, score_item, report


def score_item(item: Item, prediction: str) -> float:
    return ruler.score(item.meta["task"], prediction, item.ground_truth)


def report(records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> tuple[dict[str, Any], str]:
    cells: dict[tuple[str, int], list[float]] = {}
    for r in records:
        cells.setdefault((r["task"], int(r["length"])), []).append(r["score"])
    tasks = [t for t in settings.get("tasks", []) if any(k[0] == t for k in cells)]
    lengths = sorted({k[1] for k in cells})
    table = {k: round(100 * sum(v) / len(v), 2) for k, v in cells.items()}
    averages = {
        n: round(sum(table[(t, n)] for t in tasks if (t, n) in table) / sum((t, n) in table for t in tasks), 2)
        for n in lengths
    }
    effective = ruler.effective_length(averages)
    scores = {f"avg@{n}": averages[n] for n in lengths}
    scores.update({f"{t}@{n}": table[(t, n)] for t in tasks for n in lengths if (t, n) in table})
    data = {
        "suite": "ruler",
        "settings": settings,
        "scores": scores,
        "table": {t: {str(n): table.get((t, n)) for n in lengths} for t in tasks},
        "average": {str(n): v for n, v in averages.items()},
        "effective_length": effective,
    }
    name = settings.get("model_name", "model")
    md = [
        f"# RULER: {name}",
        "",
        f"{settings.get('samples')} samples per task and length, seed {settings.get('seed')}, greedy; "
        f"wall time {settings.get('wall_time_s', 0):.0f} s. Effective length (average above 85.6): "
        f"{effective if effective is not None else 'none'}.",
        "",
        "| task | " + " | ".join(str(n) for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
        *(
            f"| {t} | " + " | ".join(f"{table[(t, n)]:.2f}" if (t, n) in table else "-" for n in lengths) + " |"
            for t in tasks
        ),
        "| **average** | " + " | ".join(f"{averages[n]:.2f}" for n in lengths) + " |",
    ]
    return data, "\n".join(md) + "\n"
