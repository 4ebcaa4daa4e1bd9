"""The needle-in-a-haystack sweep as a harness suite: one item per (context length, depth), the
report as a depth x length table and the usual heatmap (``heatmap.png`` in the run directory).

Contract: ``build(args, tokenizer, context)`` returns ``(items, settings, score, report)`` like the
other suites; lengths above the model's context are refused. The prompt is the original's OpenAI
form (system, the context as a user turn, the question as a second user turn), merged into one user
turn when the chat template refuses two in a row. Scores are substring matches of the needle's
facts (not the original's GPT judge), and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import write_atomic
from . import needle
from .harness import Item

COLORS = ("#F0496E", "#EBB839", "#0CD79F")


def _lengths(args: Any, context: int) -> list[int]:
    if args.lengths:
        lengths = sorted(set(args.lengths))
    else:
        top = args.max_length or context
        if args.min_length > top:
            raise UserError(f"--min-length {args.min_length} is above --max-length {top}")
        lengths = needle.linspace_lengths(args.min_length, top, args.num_lengths)
    over = [n for n in lengths if n > context]
    if over:
        raise UserError(f"context length(s) {over} exceed the model's context ({context} tokens)")
    short = [n for n in lengths if n <= 400]
    if short:
        raise UserError(f"context length(s) {short} are too short: the haystack keeps length - 200 tokens")
    return lengths


def _prompt_ids(tokenizer: Any, sample: dict[str, Any], chat_format: str) -> tuple[list[int], list[dict[str, str]]]:
    from ..tokenizer import TemplateRaisedError

    try:
        return tokenizer.encode_chat(sample["messages"], chat_format=chat_format), sample["messages"]
    except (TemplateRaisedError, ValueError):  # e.g. a template that requires alternating turns
        messages = sample["merged_messages"]
        return tokenizer.encode_chat(messages, chat_format=chat_format), messages


def build(args: Any, tokenizer: Any, context: int) -> tuple[list[Item], dict[str, Any], Any, Any]:
    lengths = _lengths(args, context)
    depths = needle.depth_grid(args.depths, args.depth_spacing)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    items = []
    for length in lengths:
        for depth in depths:
            sample = needle.build(length, depth, encode, decode)
            ids, messages = _prompt_ids(tokenizer, sample, args.chat_format)
            items.append(
                Item(
                    index=len(items),
                    group="needle",
                    id=f"{length}-{depth:g}",
                    prompt_ids=ids,
                    messages=messages,
                    max_new_tokens=sample["max_new_tokens"],
                    ground_truth=list(sample["facts"]),
                    meta={"length": length, "depth": depth},
                )
            )
    settings = {
        "lengths": lengths,
        "depths": depths,
        "depth_spacing": args.depth_spacing,
        "scoring": "substring match of " + " and ".join(repr(f) for f in needle.FACTS) + " (no GPT judge)",
        "decoding": "greedy",
    }
    return items, settings, score_item, report


def score_item(item: Item, prediction: str) -> float:
    return needle.score(prediction)


def _pivot(records: Sequence[dict[str, Any]]) -> tuple[list[int], list[float], dict[tuple[float, int], float]]:
    cells: dict[tuple[float, int], list[float]] = {}
    for r in records:
        cells.setdefault((float(r["depth"]), int(r["length"])), []).append(r["score"])
    lengths = sorted({k[1] for k in cells})
    depths = sorted({k[0] for k in cells})
    return lengths, depths, {k: sum(v) / len(v) for k, v in cells.items()}


def heatmap(records: Sequence[dict[str, Any]], path: str | Path, title: str) -> None:
    """The usual chart: depth percent down, context length across, red -> yellow -> green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    lengths, depths, mean = _pivot(records)
    grid = [[mean.get((d, n), float("nan")) * 100 for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(lengths) + 3), max(4.0, 0.35 * len(depths) + 2)))
    cmap = LinearSegmentedColormap.from_list("needle", list(COLORS))
    image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, ha="right")
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xticks([x - 0.5 for x in range(1, len(lengths))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(depths))], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Token Limit")
    ax.set_ylabel("Depth Percent")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="Score (%)")
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def report(records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> tuple[dict[str, Any], str]:
    lengths, depths, mean = _pivot(records)
    by_length = {n: sum(mean[(d, n)] for d in depths if (d, n) in mean) / len(depths) for n in lengths}
    overall = 100 * sum(r["score"] for r in records) / len(records)
    scores = {"overall": overall, **{f"len {n}": 100 * v for n, v in by_length.items()}}
    data = {
        "suite": "needle",
        "settings": settings,
        "scores": scores,
        "grid": {f"{d:g}": {str(n): 100 * mean[(d, n)] for n in lengths if (d, n) in mean} for d in depths},
    }
    name = settings.get("model_name", "model")
    md = [
        f"# Needle in a haystack: {name}",
        "",
        f"{len(records)} prompts ({len(lengths)} lengths x {len(depths)} depths), greedy; "
        f"{settings.get('scoring', '')}; wall time {settings.get('wall_time_s', 0):.0f} s. Overall {overall:.1f}%.",
        "",
        "| depth % \\ tokens | " + " | ".join(str(n) for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
        *(
            f"| {d:g} | " + " | ".join(f"{100 * mean[(d, n)]:.0f}" if (d, n) in mean else "-" for n in lengths) + " |"
            for d in depths
        ),
        "| **mean** | " + " | ".join(f"{100 * by_length[n]:.0f}" for n in lengths) + " |",
    ]
    md += ["", "![needle heatmap](heatmap.png)"]
    return data, "\n".join(md) + "\n"


def write_artifacts(records: Sequence[dict[str, Any]], settings: dict[str, Any], run_dir: Path) -> None:
    heatmap(records, run_dir / "heatmap.png", f"Needle In A Haystack: {settings.get('model_name', 'model')}")
