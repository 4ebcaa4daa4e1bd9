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
Prints a table, then one JSON object as the last line.

    python benchmarks/cpu_attention.py [--peer 98f961a] [--rounds 3] [--reps 5] [--scatter]
    python benchmarks/cpu_attention.py --kv-cache-dtype int8,int4 [--only-minicpm]
    python benchmarks/cpu_attention.py --quick          # two small cases, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

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


def child(system: str, case: list, reps: int, scatter: bool, kv: str = "auto") -> dict:
    """One system on one case (this process): ms per call, and for ours the error against sdpa
    (over the dequantized cache for a quantized ``kv`` format)."""
    import inspect

    import torch
    import torch.nn.functional as F

    shape, dtype_name, rows, context = case
    heads, kv_heads, d, _ = SHAPES[shape]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    per_row = -(-context // BLOCK)
    k = torch.randn(rows, kv_heads, context, d, generator=gen).to(dtype)  # contiguous: sdpa's cache
    v = torch.randn(rows, kv_heads, context, d, generator=gen).to(dtype)
    q = torch.randn(rows, heads, d, generator=gen).to(dtype)

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=heads != kv_heads)[:, :, 0]

    if system == "sdpa":
        call = sdpa
    else:
        from minicpm.engine.cpu_kernels import paged_attention

        blocks = torch.arange(rows * per_row)
        if scatter:
            blocks = blocks[torch.randperm(len(blocks), generator=gen)]
        tables = blocks.view(rows, per_row).to(torch.int32).contiguous()
        kc = torch.zeros(rows * per_row * BLOCK, kv_heads, d, dtype=dtype)
        vc = torch.zeros_like(kc)
        for r in range(rows):  # row r's position p lives at slot tables[r, p // 64] * 64 + p % 64
            slots = (tables[r].long()[:, None] * BLOCK + torch.arange(BLOCK)).view(-1)[:context]
            kc[slots] = k[r].transpose(0, 1)
            vc[slots] = v[r].transpose(0, 1)
        row_seq = torch.arange(rows, dtype=torch.int32)
        row_len = torch.full((rows,), context, dtype=torch.int32)
        ks = vs = None
        if kv != "auto":
            from minicpm.engine.attention.kv_format import FORMATS

            fmt = FORMATS[kv]
            # values in their own groups (int4: 64), where this revision has them (a --peer may not)
            vkw = {"value": True} if "value" in inspect.signature(fmt.quantize).parameters else {}
            (kc, ks), (vc, vs) = fmt.quantize(kc), fmt.quantize(vc, **vkw)
            for r in range(rows):  # sdpa's reference: the values the quantized cache holds
                slots = (tables[r].long()[:, None] * BLOCK + torch.arange(BLOCK)).view(-1)[:context]
                k[r] = fmt.dequantize(kc[slots], ks[slots], dtype).transpose(0, 1)
                v[r] = fmt.dequantize(vc[slots], vs[slots], dtype, **vkw).transpose(0, 1)

        def call() -> torch.Tensor:
            return paged_attention(q, kc, vc, tables, row_seq, row_len, BLOCK, d**-0.5, None, ks, vs)

    out = call()  # warm up (and the kernel build)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    result = {"ms": 1000 * statistics.median(times)}
    if system != "sdpa":
        expected = sdpa().float()
        result["error"] = (out.float() - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    return result


def run(system: str, case: tuple, args: argparse.Namespace, tree: Path | None, kv: str = "auto") -> dict:
    argv = ["--child", system, "--case", json.dumps(case), "--reps", str(args.reps), "--kv", kv]
    return run_child(__file__, argv + (["--scatter"] if args.scatter else []), tree, f"{system} on {case}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", default=None, metavar="REV", help="also time this git revision's kernel")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed calls per case and round (median)")
    p.add_argument("--scatter", action="store_true", help="shuffle the blocks (default: in order)")
    p.add_argument("--quick", action="store_true", help="two small cases, one round")
    p.add_argument(
        "--kv-cache-dtype",
        default="",
        metavar="LIST",
        help="also our kernel over these quantized caches, comma-separated (int8,int4)",
    )
    p.add_argument("--only-minicpm", action="store_true", help="only the MiniCPM-2B-128k shape's cases")
    p.add_argument("--kv", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one measurement, one JSON line
        print(json.dumps(child(args.child, json.loads(args.case), args.reps, args.scatter, args.kv)))
        return

    cases = QUICK if args.quick else CASES
    if args.only_minicpm:
        cases = [c for c in cases if c[0] == "minicpm-2b-128k"]
    formats = [f for f in args.kv_cache_dtype.split(",") if f]
    bad = [f for f in formats if f not in KV_TARGETS]
    if bad:
        p.error(f"--kv-cache-dtype takes int8 and int4, not {', '.join(bad)}")
    if args.quick:
        args.rounds = 1
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
                if err > TOLERANCE[dtype]:
                    failures.append(f"{name} on {case}: error {err:.3g} > {TOLERANCE[dtype]}")
        for name, _ in systems[1:]:
            if name.startswith("minicpm "):  # the quantized cache against ours on the activation dtype's
                entry[f"{name}_speedup"] = gain = entry["minicpm"]["ms"] / entry[name]["ms"]
                fmt = name.split()[1]
                if shape == "minicpm-2b-128k" and rows == 1 and context >= 32768 and dtype == "bfloat16":
                    entry.setdefault("targets", {})[fmt] = {"need": KV_TARGETS[fmt], "holds": gain >= KV_TARGETS[fmt]}
                continue
            ours = f"minicpm {name.split()[1]}" if " " in name else "minicpm"  # the peer's format: against ours
            entry[f"speedup_vs_{name}"] = entry[name]["ms"] / entry[ours]["ms"]
        report.append(entry)

    formats_names = {f"minicpm {f}" for f in formats}
    peers = [n for n, _ in systems[1:] if n not in formats_names]
    order = "scattered" if args.scatter else "consecutive"
    print(f"decode attention, one layer, median of {rounds} rounds x {args.reps} calls ({order} blocks)")
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


if __name__ == "__main__":
    main()
