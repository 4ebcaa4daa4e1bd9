"""Quality of the quantized KV cache, minicpm against llama.cpp on the same weights and tokens
(issue 22, item 1).

The embedded default model (SmolLM2-135M-Instruct) with float weights on both sides: minicpm with
``--quantize none`` (the shipped GGUF dequantized to float32) and llama.cpp on the f32 GGUF written
from the same file (benchmarks/gguf_peer.py). Per KV cache format:

    minicpm (``minicpm eval ...``)                  llama.cpp (``llama-perplexity -fa on``)
    float32  (--kv-cache-dtype auto, float32 model) -ctk/-ctv f32, and f16 (llama.cpp's default)
    bfloat16 (auto with --dtype bfloat16)           -
    int8     (q8_0's layout)                        q8_0
    int4     (keys q4_1's layout, values a pair per 64) q4_1, and q4_0 (the issue's bar)

* Perplexity at 1k and 4k windows (``--contexts``) over the same text, llama.cpp's way (windows of
  ``context`` tokens, the second half scored), on the text's first ``--tokens`` tokens (12288 by
  default: 12 windows of 1k, 3 of 4k; llama.cpp's quantized-V flash attention on CPU takes minutes
  a 4k window): ``minicpm eval perplexity FILE --context N --json`` on the text cut after those
  windows, and ``llama-perplexity -f FILE -c N --chunks W``, each in its own process. The text is
  the first 100 kB of *Botchan* (as benchmarks/cpu_formats.py) with its CRLF line ends made LF:
  Python reads text with universal newlines and llama.cpp reads bytes, so the one file gives both
  the same characters.
  The tokens are checked, not assumed: llama.cpp's own token ids (``llama-perplexity
  --kl-divergence-base``, read from a FIFO and stopped once they are out) against minicpm's.
  llama.cpp scores ``context / 2 - 1`` tokens a window, minicpm ``context / 2`` (one more, the
  first of the half), so the targets compare each system's change against its own float cache.
* The needle grid (``minicpm eval needle``, ``--needle-lengths`` x ``--needle-depths``) and RULER
  (``minicpm eval ruler --lengths 4096 --samples N``) for each minicpm format.

Targets (the issue's): int8 within +0.5% perplexity of the activation dtype's cache (float32) at
every context and a needle grid identical to it, cell by cell; int4 within +5% and its change no
worse than llama.cpp's q4_0 KV cache's (each against its own float32 cache). Prints a table, then
one JSON object as the last line; exit status 1 when a target fails.

    python benchmarks/kv_quality.py [--quick] [--llama-bin DIR|none] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLAMA_BIN = Path.home() / ".cache/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
OURS = {
    "float32": ["--dtype", "float32", "--kv-cache-dtype", "auto"],
    "bfloat16": ["--dtype", "bfloat16", "--kv-cache-dtype", "auto"],
    "int8": ["--dtype", "float32", "--kv-cache-dtype", "int8"],
    "int4": ["--dtype", "float32", "--kv-cache-dtype", "int4"],
}
ENGINE = ["--quantize", "none", "--kv-cache-gib", "1"]
PEERS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
PEER_OF = {"float32": "f32", "int8": "q8_0", "int4": "q4_1"}  # the same layout on llama.cpp's side
PPL_LINE = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
CHUNKS_LINE = re.compile(r"calculating perplexity over (\d+) chunks")


# ------------------------------------------------------------------------------- the two systems
def minicpm(*args: str, timeout: float = 4 * 3600) -> str:
    """``minicpm ARGS`` from this tree in its own process; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "minicpm.cli", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    shown = " ".join(a for a in args if "/" not in a)
    print(f"  minicpm {shown} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return proc.stdout


def llama_ppl(bin_dir: Path, gguf: Path, text: Path, context: int, windows: int, kv: str, threads: int) -> dict:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(context)]
    cmd += ["--chunks", str(windows), "-ctk", kv, "-ctv", kv, "-fa", "on", "-t", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=6 * 3600)
    out = proc.stdout + proc.stderr
    found, chunks = PPL_LINE.search(out), CHUNKS_LINE.search(out)
    if proc.returncode != 0 or not found or not chunks:
        raise RuntimeError(f"llama-perplexity -c {context} -ctk {kv} failed (rc {proc.returncode}):\n{out[-3000:]}")
    seconds = time.perf_counter() - start
    print(f"  llama.cpp {kv} @{context}: {found.group(1)} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    windows = int(chunks.group(1))
    return {"ppl": float(found.group(1)), "stderr": float(found.group(2)), "windows": windows, "seconds": seconds}


def llama_tokens(bin_dir: Path, gguf: Path, text: Path, work: Path) -> list[int]:
    """llama.cpp's token ids of ``text``: ``llama-perplexity --kl-divergence-base`` writes them
    (whole chunks of 256) before it evaluates anything; read from a FIFO, then the tool is stopped."""
    fifo = work / "tokens.fifo"
    os.mkfifo(fifo)
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "256", "-t", "1"]
    proc = subprocess.Popen(
        [*cmd, "--kl-divergence-base", str(fifo)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )

    def unblock() -> None:  # the tool died before opening the FIFO: open its writing end so the read ends
        proc.wait()
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        with open(fifo, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:8] != b"_logits_":
                proc.kill()
                raise RuntimeError(f"llama-perplexity wrote no token dump:\n{proc.stderr.read().decode()[-2000:]}")
            n_ctx, _, n_chunk = struct.unpack("<iii", head[8:])
            data = f.read(4 * n_ctx * n_chunk)
    finally:
        proc.kill()
        proc.wait()
        fifo.unlink(missing_ok=True)
    return list(struct.unpack(f"<{len(data) // 4}i", data))


# ------------------------------------------------------------------------------------ the text
def lf_text(cache: Path) -> Path:
    """Botchan (cpu_formats.botchan) with LF line ends."""
    sys.path.insert(0, str(HERE))
    from cpu_formats import botchan

    target = cache / "botchan100k-lf.txt"
    if not target.exists():
        text = botchan(cache).read_text(encoding="utf-8")  # universal newlines: CRLF -> LF
        target.write_text(text, encoding="utf-8", newline="\n")
    return target


def window_text(tokenizer, ids: list[int], context: int, windows: int, full: Path, work: Path) -> Path:
    """A text whose tokens begin with ``windows`` whole windows of ``ids`` and hold no further one
    (the whole text when that is all of it), so both tools score exactly those windows."""
    if windows >= len(ids) // context:
        return full
    n = windows * context
    text = tokenizer.decode(ids[: n + 64])
    if tokenizer.encode(text)[:n] != ids[:n]:
        raise RuntimeError(f"the text cut after {n} tokens does not tokenize to the same {n} tokens")
    path = work / f"text-{context}x{windows}.txt"
    path.write_text(text, encoding="utf-8", newline="\n")
    return path


# ------------------------------------------------------------------------------------- driver
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bin", default=str(LLAMA_BIN), help="llama.cpp's build/bin (none: minicpm alone)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    p.add_argument("--formats", nargs="+", default=list(OURS), choices=list(OURS))
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument(
        "--tokens",
        type=int,
        default=12288,
        help="tokens of the text in windows, per context (default 12288: 12 windows of 1k, 3 of 4k; 0: all)",
    )
    p.add_argument("--needle-lengths", default="1024,2048,3072,4096")
    p.add_argument("--needle-depths", type=int, default=5)
    p.add_argument("--ruler-samples", type=int, default=3, help="RULER samples per task")
    p.add_argument("--ruler-tasks", default=None, help="comma-separated RULER tasks (default: its 11)")
    p.add_argument("--tasks", nargs="+", default=["ppl", "needle", "ruler"], choices=["ppl", "needle", "ruler"])
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the needle/RULER run directories here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 4 windows of 1k, 1 of 4k, llama.cpp f32 and q4_0, a 2x3 needle grid, 3 RULER samples",
    )
    args = p.parse_args()
    if args.quick:
        args.tokens, args.peers = 4096, [k for k in args.peers if k in ("f32", "q4_0")]
        args.needle_lengths, args.needle_depths, args.ruler_samples = "1024,2048", 3, 1
        args.ruler_tasks = args.ruler_tasks or "niah_single_1,niah_multikey_1,vt"
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from gguf_peer import write_dequantized

    from minicpm import Tokenizer
    from minicpm.default_model import cache_root, default_gguf, default_model_path

    cache = cache_root() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    text = lf_text(cache)
    tokenizer = Tokenizer.from_pretrained(default_model_path())
    ids = tokenizer.encode(text.read_text(encoding="utf-8"))
    tokens = len(ids) if args.tokens == 0 else args.tokens
    windows = {c: max(1, min(tokens, len(ids)) // c) for c in args.contexts}
    if any(len(ids) < 2 * c for c in args.contexts):
        raise SystemExit(f"llama-perplexity needs a text of two windows; this one is {len(ids)} tokens")
    bin_dir = None if args.llama_bin == "none" else Path(args.llama_bin)
    if bin_dir is not None and not (bin_dir / "llama-perplexity").exists():
        raise SystemExit(f"no llama-perplexity in {bin_dir} (--llama-bin none runs minicpm alone)")
    report: dict = {
        "benchmark": "kv_quality",
        "quick": args.quick,
        "text": text.name,
        "text_tokens": len(ids),
        "windows": {str(c): w for c, w in windows.items()},
        "minicpm": {f: {} for f in args.formats},
        "llama.cpp": {},
    }
    work = Path(tempfile.mkdtemp(prefix="kv_quality-", dir=cache))
    try:
        gguf = write_dequantized(default_gguf(), cache / "smollm2.f32.gguf", "f32") if bin_dir else None
        if bin_dir and "ppl" in args.tasks:
            theirs = llama_tokens(bin_dir, gguf, text, work)
            same = next((i for i, (a, b) in enumerate(zip(ids, theirs, strict=False)) if a != b), None)
            report["tokens"] = {
                "minicpm": len(ids),
                "llama.cpp_compared": len(theirs),
                "llama.cpp_chunks_consistent": len(theirs) == len(ids) // 256 * 256,
                "first_difference": same,
                "identical": same is None and len(theirs) == len(ids) // 256 * 256,
            }
        if "ppl" in args.tasks:
            measure_ppl(args, report, tokenizer, ids, windows, text, work, bin_dir, gguf)
        if "needle" in args.tasks:
            for fmt in args.formats:
                out = work / f"needle-{fmt}"
                flags = ["--lengths", args.needle_lengths, "--depths", str(args.needle_depths)]
                minicpm("eval", "needle", *flags, *OURS[fmt], *ENGINE, "--output", str(out), "--no-progress")
                r = json.loads((out / "report.json").read_text())
                report["minicpm"][fmt]["needle"] = {"overall": r["scores"]["overall"], "grid": r["grid"]}
        if "ruler" in args.tasks:
            for fmt in args.formats:
                out = work / f"ruler-{fmt}"
                flags = ["--lengths", "4096", "--samples", str(args.ruler_samples)]
                flags += ["--tasks", args.ruler_tasks] if args.ruler_tasks else []
                minicpm("eval", "ruler", *flags, *OURS[fmt], *ENGINE, "--output", str(out), "--no-progress")
                r = json.loads((out / "report.json").read_text())
                report["minicpm"][fmt]["ruler"] = {"avg@4096": r["average"]["4096"], "tasks": r["table"]}
        if args.keep:
            for run in work.glob("*-*"):
                if run.is_dir():
                    shutil.copytree(run, Path(args.keep) / run.name, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["targets"] = targets(report, args.contexts)
    report["ruler_samples"] = args.ruler_samples
    report["needle_grid"] = {"lengths": args.needle_lengths, "depths": args.needle_depths}
    print_table(report, args.contexts)
    print(json.dumps(report))
    return 0 if all(report["targets"].values()) else 1


def measure_ppl(args, report, tokenizer, ids, windows, text, work, bin_dir, gguf) -> None:
    for c in args.contexts:
        path = window_text(tokenizer, ids, c, windows[c], text, work)
        for fmt in args.formats:
            flags = ["--context", str(c), "--json", "--quantize", "none", "--kv-cache-gib", "0.25"]
            r = json.loads(minicpm("eval", "perplexity", str(path), *flags, *OURS[fmt]).strip().splitlines()[-1])
            report["minicpm"][fmt][f"ppl@{c}"] = {k: r[k] for k in ("perplexity", "stderr", "scored_tokens", "windows")}
        for kv in args.peers if bin_dir else []:
            r = llama_ppl(bin_dir, gguf, text, c, windows[c], kv, args.threads)  # the first windows[c] chunks
            report["llama.cpp"].setdefault(kv, {})[f"ppl@{c}"] = r
            if r["windows"] != windows[c]:
                raise RuntimeError(f"llama.cpp scored {r['windows']} windows of {c}, minicpm {windows[c]}")
    for c in args.contexts:  # each system's change against its own float32 cache
        key = f"ppl@{c}"
        base = report["minicpm"].get("float32", {}).get(key)
        for row in report["minicpm"].values():
            if base and key in row:
                row[key]["delta_pct"] = 100 * (row[key]["perplexity"] / base["perplexity"] - 1)
        base = report["llama.cpp"].get("f32", {}).get(key)
        for row in report["llama.cpp"].values():
            if base and key in row:
                row[key]["delta_pct"] = 100 * (row[key]["ppl"] / base["ppl"] - 1)


def targets(r: dict, contexts: list[int]) -> dict[str, bool]:
    t: dict[str, bool] = {}
    ours, peer = r["minicpm"], r["llama.cpp"]
    for c in contexts:
        key = f"ppl@{c}"
        if "delta_pct" in ours.get("int8", {}).get(key, {}):
            t[f"int8_{key}_within_0.5pct"] = ours["int8"][key]["delta_pct"] <= 0.5
        if "delta_pct" in ours.get("int4", {}).get(key, {}):
            t[f"int4_{key}_within_5pct"] = ours["int4"][key]["delta_pct"] <= 5.0
            if "delta_pct" in peer.get("q4_0", {}).get(key, {}):
                t[f"int4_{key}_no_worse_than_llama.cpp_q4_0"] = (
                    ours["int4"][key]["delta_pct"] <= peer["q4_0"][key]["delta_pct"]
                )
    if "needle" in ours.get("int8", {}) and "needle" in ours.get("float32", {}):
        t["int8_needle_grid_unchanged"] = ours["int8"]["needle"]["grid"] == ours["float32"]["needle"]["grid"]
    return t


def print_table(r: dict, contexts: list[int]) -> None:
    def cell(row: dict, key: str, name: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v[name]:.3f} ({v.get('delta_pct', 0):+.2f}%)"

    tokens = r.get("tokens")
    if tokens:
        same = "identical" if tokens["identical"] else f"first difference at {tokens['first_difference']}"
        print(f"tokens: minicpm {tokens['minicpm']}; llama.cpp's first {tokens['llama.cpp_compared']}: {same}")
    print(f"windows: {r['windows']}")
    head = f"{'system':<10} {'KV':<9}" + "".join(f" {'ppl@' + str(c):>20}" for c in contexts)
    print(head + f" {'needle':>7} {'RULER@4k':>9}")
    for fmt, row in r["minicpm"].items():
        needle = f"{row['needle']['overall']:.1f}" if "needle" in row else "-"
        ruler = f"{row['ruler']['avg@4096']:.1f}" if "ruler" in row else "-"
        cells = "".join(f" {cell(row, f'ppl@{c}', 'perplexity'):>20}" for c in contexts)
        print(f"{'minicpm':<10} {fmt:<9}{cells} {needle:>7} {ruler:>9}")
    for kv, row in r["llama.cpp"].items():
        print(f"{'llama.cpp':<10} {kv:<9}" + "".join(f" {cell(row, f'ppl@{c}', 'ppl'):>20}" for c in contexts))
    for name, ok in r["targets"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
