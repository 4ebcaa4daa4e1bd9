"""A/B of this tree against an older revision: any benchmark of ``benchmarks/``, run alternately
(A, B, A, B) with each tree's own copy of the script and package, its JSON figures compared.

The peer revision is checked out once in a detached worktree next to the repository
(``../minicpm-ab-REV``). Each round runs the benchmark command once per tree, the order swapped
every other round, with ``PYTHONPATH`` pointing at that tree (so every process the benchmark
starts imports that tree's package). From each run's last stdout line (the benchmarks' one JSON
object) every numeric figure whose path matches ``--keys`` is kept; printed per figure: this tree's
median and range, the peer's, and this tree's median over the peer's. The last line is one JSON
object with all of it.

    python benchmarks/ab.py --peer REV [--rounds 3] [--keys REGEX] -- benchmarks/cpu_formats.py --tasks decode

Speed figures are only comparable within one run: nothing else should be running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peer_tree(rev: str) -> Path:
    """A detached worktree of ``rev`` next to the repository (made once)."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    tree = ROOT.parent / f"minicpm-ab-{sha}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha], check=True)
    return tree


def figures(obj: object, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its dotted path (list items by index)."""
    out: dict[str, float] = {}
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        out[prefix] = float(obj)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(figures(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out.update(figures(value, f"{prefix}.{i}" if prefix else str(i)))
    return out


def run(tree: Path, script: str, argv: list[str], timeout: float) -> dict:
    """The benchmark's JSON object from one run in ``tree``; a failed run raises with its stderr."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run(
        [sys.executable, str(tree / script), *argv],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script} in {tree} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, metavar="REV", help="the revision to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--keys", default=".", help="regex: the figures (dotted JSON paths) to report")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark run")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- benchmarks/SCRIPT.py [its arguments]")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or not command[0].startswith("benchmarks/"):
        p.error("give the benchmark after --, as benchmarks/SCRIPT.py [arguments]")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    script, argv = command[0], command[1:]
    trees = {"this": ROOT, "peer": peer_tree(args.peer)}
    if not (trees["peer"] / script).exists():
        p.error(f"{script} does not exist at {args.peer}")
    keys = re.compile(args.keys)
    seen: dict[str, dict[str, list[float]]] = {"this": {}, "peer": {}}
    for r in range(args.rounds):
        order = ("this", "peer") if r % 2 == 0 else ("peer", "this")
        for name in order:
            for key, value in figures(run(trees[name], script, argv, args.timeout)).items():
                if keys.search(key):
                    seen[name].setdefault(key, []).append(value)
            print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr, flush=True)
    report = {}
    print(f"{'figure':60} {'this (median, range)':>28} {'peer (median, range)':>28} {'this/peer':>9}")
    for key in sorted(set(seen["this"]) & set(seen["peer"])):
        a, b = summary(seen["this"][key]), summary(seen["peer"][key])
        ratio = a["median"] / b["median"] if b["median"] else None
        report[key] = {"this": a, "peer": b, "ratio": ratio}

        def cell(s: dict) -> str:
            return f"{s['median']:.4g} [{s['min']:.4g}, {s['max']:.4g}]"

        shown = "n/a" if ratio is None else f"{ratio:.3f}"
        print(f"{key[:60]:60} {cell(a):>28} {cell(b):>28} {shown:>9}")
    print(
        json.dumps({"benchmark": "ab", "peer": args.peer, "command": command, "rounds": args.rounds, "figures": report})
    )


if __name__ == "__main__":
    main()
