"""Decode attention on CPU: the native paged kernel against an older revision's and against torch's
``scaled_dot_product_attention`` over a contiguous cache (what transformers runs for each layer).

Shapes: MiniCPM-2B-128k's attention (36 heads, 36 kv heads, head_dim 64, 40 layers) and the
default model's (SmolLM2-135M: 9 heads, 3 kv heads, head_dim 64, 30 layers), in bfloat16 and
float32. A case is (shape, dtype, rows, context): one layer's paged cache (blocks of 64, handed
out in order as the engine does; ``--scatter`` shuffles them) holds each row's context, and one
call attends every row's query to it. Each system runs each case in its own process, rounds
alternating (ours, the peer revision's kernel, sdpa); the figure is the median of ``--reps``
calls, then the median over rounds with its range.

Reported per case: ms per layer, the keys and values read per second, ms per token for the whole
model (x layers: how long decode attention alone makes a token) and our speed-up over each peer.
Our output is checked against sdpa's in every run (exit 1 past rounding: the comparison would not
be like for like). ``--kv-cache-dtype int8,int4`` adds our kernel over a quantized cache of the
same keys and values (checked against sdpa over their dequantized values; GB/s counts the bytes
the format stores; with ``--peer``, the revision's kernel on each format too) and its speed-up
over our kernel on the activation dtype's cache; the issue's
targets (at MiniCPM's shape, one row, 32k and 128k: int8 >= 1.8x, int4 >= 3x) are reported.
Every paged cache, in every format, sits on memory laid out as the engine lays out its own
(``--pages engine``, the default): transparent huge pages asked for before the first touch
(``advise_huge_pages``), as ``PagedKVCache`` does for a pool of at least 64 MiB a layer (any CPU
budget of 5 GiB or more at these shapes). ``--pages 4k`` leaves them on 4 KiB pages (the layout
of the figures before 2026-12-08). sdpa's contiguous cache is a plain torch tensor, as
transformers' is.
``--paired`` measures those speed-ups where they are least at the mercy of a host whose memory
bandwidth moves from one minute to the next: per case and round, one process holds the cache in
the activation dtype and in each ``--kv-cache-dtype`` format (the same keys and values) and times
our kernel on each in turn, call by call, which goes first rotating every cycle; a format's
speed-up is the median of every cycle's ratio over all rounds, with their range (no sdpa timing;
each format's output is still checked against sdpa). With ``--peer REV`` the revision's kernel is
built into the same process (its C sources, this revision's flags) and timed on every format in
the same cycles: ours over the peer's, per format, is again a median of the cycles' ratios.
Prints a table, then one JSON object as the last line.

    python benchmarks/cpu_attention.py [--peer 98f961a] [--rounds 3] [--reps 5] [--scatter]
    python benchmarks/cpu_attention.py --kv-cache-dtype int8,int4 [--only-minicpm]
    python benchmarks/cpu_attention.py --kv-cache-dtype int8,int4 --only-minicpm --paired --reps 15
    python benchmarks/cpu_attention.py --kv-cache-dtype int8,int4 --only-minicpm --paired --peer 17239b0
    python benchmarks/cpu_attention.py --quick          # two small cases, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from cpu_mixed import median_of, peer_tree, run_child

SHAPES = {  # heads, kv heads, head_dim, layers
    "minicpm-2b-128k": (36, 36, 64, 40),
    "smollm2-135m": (9, 3, 64, 30),
}
CASES = [  # shape, dtype, rows, context
    ("minicpm-2b-128k", "bfloat16", 1, 4096),
    ("minicpm-2b-128k", "bfloat16", 1, 32768),
    ("minicpm-2b-128k", "bfloat16", 1, 131072),
    ("minicpm-2b-128k", "bfloat16", 4, 32768),
    ("minicpm-2b-128k", "float32", 1, 32768),
    ("smollm2-135m", "float32", 16, 2048),
    ("smollm2-135m", "float32", 16, 16384),
    ("smollm2-135m", "bfloat16", 16, 16384),
]
QUICK = [("minicpm-2b-128k", "bfloat16", 1, 2048), ("smollm2-135m", "float32", 4, 1024)]
BLOCK = 64
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # max abs error over max |sdpa|


KV_TARGETS = {"int8": 1.8, "int4": 3.0}  # speed-up over the activation dtype's cache, one row, 32k and 128k


def judged(case) -> bool:
    """Whether ``case`` is one the KV_TARGETS are judged on (MiniCPM's shape, bfloat16, one row, 32k up)."""
    shape, dtype, rows, context = case
    return shape == "minicpm-2b-128k" and rows == 1 and context >= 32768 and dtype == "bfloat16"


def check_error(name: str, case, err: float, failures: list[str]) -> None:
    """Adds to ``failures`` where ``name``'s error on ``case`` is past its dtype's rounding."""
    if err > TOLERANCE[case[1]]:
        failures.append(f"{name} on {case}: error {err:.3g} > {TOLERANCE[case[1]]}")


PAGES = ("engine", "4k")


def _placed(t, pages: str):
    """``t``'s values in a new tensor laid out as ``pages`` says: "engine" asks for transparent huge
    pages before the first touch, as the engine's KV pool does; "4k": ``t`` itself (a plain tensor)."""
    import torch

    if pages == "4k":
        return t
    from minicpm.engine.cpu_kernels import advise_huge_pages

    placed = torch.empty_like(t)
    advise_huge_pages(placed)  # False (nothing asked) off Linux: then as "4k"
    return placed.copy_(t)


def _cache(case: list, scatter: bool, pages: str = "engine") -> SimpleNamespace:
    """One case's query, its contiguous keys and values (sdpa's cache: rows, kv heads, context,
    head_dim) and the same values in one layer's paged cache in the activation dtype (blocks of
    64; row r's position p at slot ``tables[r, p // 64] * 64 + p % 64``), on ``pages``
    (:func:`_placed`)."""
    import torch

    shape, dtype_name, rows, context = case
    heads, kv_heads, d, _ = SHAPES[shape]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    per_row = -(-context // BLOCK)
    k = torch.randn(rows, kv_heads, context, d, generator=gen).to(dtype)
    v = torch.randn(rows, kv_heads, context, d, generator=gen).to(dtype)
    q = torch.randn(rows, heads, d, generator=gen).to(dtype)
    blocks = torch.arange(rows * per_row)
    if scatter:
        blocks = blocks[torch.randperm(len(blocks), generator=gen)]
    tables = blocks.view(rows, per_row).to(torch.int32).contiguous()
    slots = [(tables[r].long()[:, None] * BLOCK + torch.arange(BLOCK)).view(-1)[:context] for r in range(rows)]
    kc = torch.zeros(rows * per_row * BLOCK, kv_heads, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    for r in range(rows):
        kc[slots[r]] = k[r].transpose(0, 1)
        vc[slots[r]] = v[r].transpose(0, 1)
    kc, vc = _placed(kc, pages), _placed(vc, pages)
    return SimpleNamespace(
        q=q,
        k=k,
        v=v,
        kc=kc,
        vc=vc,
        tables=tables,
        slots=slots,
        dtype=dtype,
        d=d,
        gqa=heads != kv_heads,
        pages=pages,
        row_seq=torch.arange(rows, dtype=torch.int32),
        row_len=torch.full((rows,), context, dtype=torch.int32),
    )


def _stored(c: SimpleNamespace, kv: str) -> tuple:
    """The paged cache in format ``kv`` ("auto": the activation dtype's) as (kc, vc, ks, vs), and
    the contiguous keys and values it holds (dequantized), sdpa's reference for it."""
    import inspect

    if kv == "auto":
        return (c.kc, c.vc, None, None), (c.k, c.v)
    from minicpm.engine.attention.kv_format import FORMATS

    fmt = FORMATS[kv]
    # values in their own groups (int4: 64), where this revision has them (a --peer may not)
    vkw = {"value": True} if "value" in inspect.signature(fmt.quantize).parameters else {}
    (kc, ks), (vc, vs) = fmt.quantize(c.kc), fmt.quantize(c.vc, **vkw)
    kc, ks, vc, vs = (_placed(t, c.pages) for t in (kc, ks, vc, vs))  # as the engine's pool: see _cache
    k, v = c.k.clone(), c.v.clone()
    for r, slots in enumerate(c.slots):
        k[r] = fmt.dequantize(kc[slots], ks[slots], c.dtype).transpose(0, 1)
        v[r] = fmt.dequantize(vc[slots], vs[slots], c.dtype, **vkw).transpose(0, 1)
    return (kc, vc, ks, vs), (k, v)


def _sdpa(c: SimpleNamespace, k, v):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(c.q[:, :, None], k, v, enable_gqa=c.gqa)[:, :, 0]


def _ours(c: SimpleNamespace, stored: tuple, lib=None):
    """A call of our kernel (or of ``lib``: another revision's kernel library) on the paged cache
    ``stored`` (kc, vc, ks, vs)."""
    from minicpm.engine.cpu_kernels import paged_attention

    kc, vc, ks, vs = stored
    return lambda: paged_attention(c.q, kc, vc, c.tables, c.row_seq, c.row_len, BLOCK, c.d**-0.5, lib, ks, vs)


def _error(out, expected) -> float:
    expected = expected.float()
    return (out.float() - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def child(system: str, case: list, reps: int, scatter: bool, kv: str = "auto", pages: str = "engine") -> dict:
    """One system on one case (this process): ms per call, and for ours the error against sdpa
    (over the dequantized cache for a quantized ``kv`` format)."""
    c = _cache(case, scatter, pages)
    if system == "sdpa":
        call, ref = (lambda: _sdpa(c, c.k, c.v)), None
    else:
        stored, ref = _stored(c, kv)
        call = _ours(c, stored)
    out = call()  # warm up (and the kernel build)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    result = {"ms": 1000 * statistics.median(times)}
    if ref is not None:
        result["error"] = _error(out, _sdpa(c, *ref))
    return result


def paired_child(
    case: list, formats: list[str], reps: int, scatter: bool, peer_csrc: str | None = None, pages: str = "engine"
) -> dict:
    """``--paired``: our kernel over the activation dtype's cache and over each quantized format of
    the same keys and values, all held in this process and timed call by call in turn (which goes
    first rotating every cycle), so each cycle's calls see the same machine. Per format: ms (median
    of ``reps`` calls), each cycle's speed-up over the activation dtype's cache (``ratios``) and the
    error against sdpa over the values the cache holds. With ``peer_csrc`` (a peer revision's C
    sources, built into a second library in this process) the peer's kernel is timed on every
    format in the same cycles: ``peer`` holds its ms and error per format, and ``vs_peer`` each
    cycle's peer time over ours on that format."""
    from minicpm.engine.cpu_kernels import kernels_from

    c = _cache(case, scatter, pages)
    names = ["auto", *formats]
    peer = kernels_from(Path(peer_csrc)) if peer_csrc else None
    calls, errors = {}, {}
    paged = 0  # bytes of the paged caches, every format
    for kv in names:
        stored, ref = _stored(c, kv)
        paged += sum(t.nbytes for t in stored if t is not None)
        expected = _sdpa(c, *ref)
        del ref
        calls[kv] = _ours(c, stored)
        errors[kv] = _error(calls[kv](), expected)  # also the warm-up (and the kernel build)
        if peer is not None:
            calls[f"{kv}@peer"] = _ours(c, stored, peer)
            errors[f"{kv}@peer"] = _error(calls[f"{kv}@peer"](), expected)
        del expected
    from cpu_real_shape import status_bytes

    # what of the process's memory Linux put on huge pages (with THP on "madvise", only the
    # advised paged caches can be), over the paged caches' bytes
    huge = status_bytes("AnonHugePages", source="smaps_rollup") or 0
    # ours on every format, then the peer's: a call never follows one on the same cache, which
    # would find it warm (a small case's cache fits in the last-level cache)
    order = names + [f"{kv}@peer" for kv in names if peer is not None]
    times: dict[str, list[float]] = {name: [] for name in order}
    for i in range(reps):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)

    def cycles(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    result = {
        kv: {"ms": 1000 * statistics.median(times[kv]), "error": errors[kv], "ratios": cycles("auto", kv)}
        for kv in names
    }
    result["pages"] = {"paged_bytes": paged, "huge_bytes": huge}
    if peer is not None:
        for kv in names:
            p = f"{kv}@peer"
            result[kv]["peer"] = {"ms": 1000 * statistics.median(times[p]), "error": errors[p]}
            result[kv]["vs_peer"] = cycles(p, kv)
    return result


def run(system: str, case: tuple, args: argparse.Namespace, tree: Path | None, kv: str = "auto") -> dict:
    argv = ["--child", system, "--case", json.dumps(case), "--reps", str(args.reps), "--kv", kv, "--pages", args.pages]
    if system == "paired" and args.peer:  # the peer's kernel built into the same process
        argv += ["--peer-csrc", str(peer_tree(args.peer) / "minicpm" / "engine" / "csrc")]
    return run_child(__file__, argv + (["--scatter"] if args.scatter else []), tree, f"{system} on {case}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", default=None, metavar="REV", help="also time this git revision's kernel")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed calls per case and round (median)")
    p.add_argument("--scatter", action="store_true", help="shuffle the blocks (default: in order)")
    p.add_argument("--quick", action="store_true", help="two small cases, one round")
    p.add_argument(
        "--pages",
        choices=PAGES,
        default="engine",
        help="the paged caches' memory: as the engine's pool (huge pages asked for; default) or 4 KiB pages",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="",
        metavar="LIST",
        help="also our kernel over these quantized caches, comma-separated (int8,int4)",
    )
    p.add_argument("--only-minicpm", action="store_true", help="only the MiniCPM-2B-128k shape's cases")
    p.add_argument(
        "--paired",
        action="store_true",
        help="time the --kv-cache-dtype formats and the activation dtype's cache call by call in one process",
    )
    p.add_argument("--kv", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--peer-csrc", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "paired":  # one process, every format in turn
        got = paired_child(
            json.loads(args.case), args.kv.split(","), args.reps, args.scatter, args.peer_csrc, args.pages
        )
        print(json.dumps(got))
        return
    if args.child:  # one measurement, one JSON line
        print(json.dumps(child(args.child, json.loads(args.case), args.reps, args.scatter, args.kv, args.pages)))
        return

    cases = QUICK if args.quick else CASES
    if args.only_minicpm:
        cases = [c for c in cases if c[0] == "minicpm-2b-128k"]
    formats = [f for f in args.kv_cache_dtype.split(",") if f]
    bad = [f for f in formats if f not in KV_TARGETS]
    if bad:
        p.error(f"--kv-cache-dtype takes int8 and int4, not {', '.join(bad)}")
    if args.paired and not formats:
        p.error("--paired times --kv-cache-dtype formats against the activation dtype's cache: name them")
    if args.quick:
        args.rounds = 1
    if args.paired:
        paired(args, cases, formats)
        return
    rounds = args.rounds
    systems: list[tuple[str, Path | None]] = [("minicpm", None)]
    systems += [(f"minicpm {f}", None) for f in formats]
    if args.peer:
        tree = peer_tree(args.peer)
        systems.append((f"minicpm@{args.peer}", tree))
        systems += [(f"minicpm@{args.peer} {f}", tree) for f in formats]
    systems.append(("sdpa", None))
    runs: dict[tuple, list[dict]] = {}
    for _ in range(rounds):
        for case in cases:
            for name, tree in systems:
                system = "sdpa" if name == "sdpa" else "ours"
                kv = name.split()[1] if " " in name else "auto"
                runs.setdefault((tuple(case), name), []).append(run(system, case, args, tree, kv))
    report, failures = [], []
    for case in cases:
        shape, dtype, rows, context = case
        _, kv_heads, d, layers = SHAPES[shape]
        nbytes = 2 * rows * context * kv_heads * d * (2 if dtype == "bfloat16" else 4)
        entry: dict = {"shape": shape, "dtype": dtype, "rows": rows, "context": context, "kv_bytes": nbytes}
        for name, _ in systems:
            results = runs[(tuple(case), name)]
            entry[name] = figures = median_of(results)
            stored = nbytes
            if " " in name:  # the bytes the quantized format stores
                from minicpm.engine.attention.kv_format import FORMATS

                fmt = FORMATS[name.split()[1]]
                stored = rows * context * kv_heads * (fmt.bytes_per_row(d) + fmt.bytes_per_row(d, value=True))
            figures["gb_s"] = stored / figures["ms"] / 1e6
            figures["model_ms_per_token"] = figures["ms"] * layers
            if "error" in figures:
                figures["error"] = err = figures["error_range"][1]  # the worst round
                check_error(name, case, err, failures)
        for name, _ in systems[1:]:
            if name.startswith("minicpm "):  # the quantized cache against ours on the activation dtype's
                entry[f"{name}_speedup"] = gain = entry["minicpm"]["ms"] / entry[name]["ms"]
                fmt = name.split()[1]
                if judged(case):
                    entry.setdefault("targets", {})[fmt] = {"need": KV_TARGETS[fmt], "holds": gain >= KV_TARGETS[fmt]}
                continue
            ours = f"minicpm {name.split()[1]}" if " " in name else "minicpm"  # the peer's format: against ours
            entry[f"speedup_vs_{name}"] = entry[name]["ms"] / entry[ours]["ms"]
        report.append(entry)

    formats_names = {f"minicpm {f}" for f in formats}
    peers = [n for n, _ in systems[1:] if n not in formats_names]
    order = "scattered" if args.scatter else "consecutive"
    print(
        f"decode attention, one layer, median of {rounds} rounds x {args.reps} calls ({order} blocks, "
        f"{args.pages} pages)"
    )
    head = f"{'shape':16s} {'dtype':8s} {'rows':>4s} {'context':>7s}"
    for name, _ in systems:
        head += f" | {name[:18]:>18s} ms   GB/s"
    print(head + " | speed-ups")
    for e in report:
        line = f"{e['shape']:16s} {e['dtype']:8s} {e['rows']:4d} {e['context']:7d}"
        for name, _ in systems:
            line += f" | {e[name]['ms']:21.2f} {e[name]['gb_s']:6.1f}"
        gains = [
            f"{e[f'{n}_speedup']:.2f}x ({n.split()[1]} over {e['dtype']})" for n, _ in systems if n in formats_names
        ]
        line += " | " + ", ".join(gains + [f"{e[f'speedup_vs_{n}']:.2f}x vs {n}" for n in peers])
        print(line)
    for f in failures:
        print("NOT like for like:", f)
    print(json.dumps({"benchmark": "cpu_attention", "settings": vars(args), "results": report, "failures": failures}))
    if failures:
        sys.exit(1)


def paired(args: argparse.Namespace, cases: list, formats: list[str]) -> None:
    """``--paired``: per case and round, one process times every format in turn (paired_child);
    a format's speed-up is the median of every cycle's ratio over all rounds, with their range."""
    report, failures = [], []
    for case in cases:
        shape, dtype, rows, context = case
        got = [run("paired", case, args, None, ",".join(formats)) for _ in range(args.rounds)]
        entry: dict = {"shape": shape, "dtype": dtype, "rows": rows, "context": context}
        if args.pages == "engine":  # the least share of the paged caches' bytes Linux put on huge pages
            entry["huge_page_share"] = min(g["pages"]["huge_bytes"] / g["pages"]["paged_bytes"] for g in got)
        for kv in ["auto", *formats]:
            entry[kv] = figures = median_of([{"ms": g[kv]["ms"]} for g in got])
            figures["error"] = err = max(g[kv]["error"] for g in got)
            check_error(kv, case, err, failures)
            if args.peer:  # the peer revision's kernel on the same cache, in the same cycles
                figures["peer"] = median_of([{"ms": g[kv]["peer"]["ms"]} for g in got])
                figures["peer"]["error"] = err = max(g[kv]["peer"]["error"] for g in got)
                check_error(f"{kv}@{args.peer}", case, err, failures)
                figures |= median_of([{"speedup_vs_peer": r} for g in got for r in g[kv]["vs_peer"]])
            if kv == "auto":
                continue
            figures |= median_of([{"speedup": r} for g in got for r in g[kv]["ratios"]])
            gain = figures["speedup"]
            figures["speedup_by_round"] = [statistics.median(g[kv]["ratios"]) for g in got]
            if judged(case):
                entry.setdefault("targets", {})[kv] = {"need": KV_TARGETS[kv], "holds": gain >= KV_TARGETS[kv]}
        report.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    print(
        f"decode attention, one layer, paired in one process: {args.rounds} rounds x {args.reps} cycles "
        f"({'scattered' if args.scatter else 'consecutive'} blocks, {args.pages} pages); "
        "speed-up: median of every cycle's ratio [range]"
    )
    for e in report:
        line = f"{e['shape']:16s} {e['dtype']:8s} {e['rows']:4d} {e['context']:7d}"
        if "huge_page_share" in e:
            line += f" | huge pages {e['huge_page_share']:.0%}"
        line += f" | {e['dtype']} {e['auto']['ms']:.2f} ms"
        for kv in formats:
            f = e[kv]
            lo, hi = f["speedup_range"]
            line += f" | {kv} {f['ms']:.2f} ms, {f['speedup']:.2f}x [{lo:.2f}, {hi:.2f}]"
            if kv in e.get("targets", {}):
                line += f" (target {KV_TARGETS[kv]}x: {'holds' if e['targets'][kv]['holds'] else 'not met'})"
        if args.peer:
            vs = [f"{kv if kv != 'auto' else e['dtype']} {e[kv]['speedup_vs_peer']:.2f}x" for kv in ["auto", *formats]]
            line += f" | ours vs {args.peer}: " + ", ".join(vs)
        print(line)
    for f in failures:
        print("NOT like for like:", f)
    summary = {"benchmark": "cpu_attention", "paired": True, "settings": vars(args), "results": report}
    print(json.dumps(summary | {"failures": failures}))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
