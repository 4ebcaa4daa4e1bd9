"""Weight formats on CPU, minicpm against llama.cpp (and vLLM's CPU build for prefill), same weights.

The embedded default model (SmolLM2-135M-Instruct, a Q4_1 GGUF with a Q8_0 table) in five
formats, each beside llama.cpp's counterpart on GGUFs written from the very same weights:

    minicpm                                  llama.cpp (llama-cpp-python)
    float32  (--quantize none)               f32   (the GGUF dequantized, benchmarks/gguf_peer.py)
    bfloat16 (--quantize none --dtype bf16)  bf16  (likewise)
    int8     (--quantize int8, per channel)  Q8_0  (llama.cpp's quantizer on the f32 GGUF)
    int4     (--quantize int4, groups of 32) Q4_1  (likewise)
    shipped  (--quantize auto: Q4_1 / Q8_0)  the shipped GGUF itself

Per format: batch-1 greedy decode tokens/s ((N - 1) / (time for N - time for 1)); peak resident
memory while decoding (``VmHWM`` after a reset at the end of warm-up), absolute and over the
process's own baseline before loading (what the model, its cache and its buffers add: the
runtimes differ by ~300 MB of torch); perplexity on the same tokens (llama.cpp's way: windows of
``--context`` tokens scored on their second half, :mod:`minicpm.eval.perplexity`; llama.cpp's
logits through ``logits_all``). Then prefill of 2k and 8k tokens (shipped, float32 and bfloat16),
quiet and with another process spinning on one core, against llama.cpp on the same formats and
(``--vllm-python``) vLLM's CPU build in bfloat16 and float32 (the prefill target: our fastest format
against the fastest peer); and batch-1 decode quiet and loaded.

Every measurement runs in its own process; the systems alternate (A, B, A, B) for ``--rounds``
rounds (``--prefill-rounds`` for prefill, default 1: an 8k-token prefill on one loaded core takes
minutes; vLLM one round) and medians are reported with their ranges. The text: ``--text FILE`` (default: the first
100 kB of *Botchan*, ``test/botchan.txt`` in sentencepiece's source archive, fetched once with
``pip download``). Prints a table, then one JSON object with the ratios and which targets hold.

    python benchmarks/cpu_formats.py [--llama-python PY] [--vllm-python PY] [--rounds 3] [--tiny]

``--tiny`` runs every path of minicpm's side at a small size (the test suite does), peers only if
they are importable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OURS = {
    "float32": {"quantize": "none", "dtype": "float32"},
    "bfloat16": {"quantize": "none", "dtype": "bfloat16"},
    "int8": {"quantize": "int8", "dtype": "float32"},
    "int4": {"quantize": "int4", "dtype": "float32"},
    "shipped": {"quantize": "auto", "dtype": "float32"},
}
PEER = {"float32": "f32", "bfloat16": "bf16", "int8": "Q8_0", "int4": "Q4_1", "shipped": "shipped"}
SPIN = "while True: pass"
MARK = "RESULT "  # a worker's answer line (peers print their own logs to stdout too)


# ------------------------------------------------------------------------------------ workers
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


class _Spinner:
    """Another process busy on one core while the block runs (when ``on``)."""

    def __init__(self, on: bool) -> None:
        self.on, self.proc = on, None

    def __enter__(self) -> _Spinner:
        if self.on:
            self.proc = subprocess.Popen([sys.executable, "-c", SPIN])
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def prefill_prompt(ids: list[int], spec: dict, length: int, loaded: bool) -> list[int]:
    """A prefill prompt of ``length`` tokens, a different stretch of the text for each measurement
    of a worker (a repeated prompt would be served from the prefix cache)."""
    cases = [(p, lo) for p in spec["lengths"] for lo in spec["loads"]]
    start = 256 + sum(p for p, lo in cases[: cases.index((length, loaded))])
    return ids[start : start + length]


def _decode_rate(first: float, total: float, n: int) -> float:
    return (n - 1) / (total - first)


def worker_minicpm(spec: dict) -> dict:
    base = _rss("VmRSS")
    import torch

    from minicpm import LLM, SamplingParams
    from minicpm.engine import EngineConfig
    from minicpm.eval.perplexity import perplexity

    base = max(base, _rss("VmRSS"))  # the runtime, imported
    fmt = OURS[spec["format"]]
    ids = json.loads(Path(spec["tokens"]).read_text())
    config = EngineConfig(quantize=fmt["quantize"], kv_cache_memory=spec.get("kv_bytes", 1 << 30))
    llm = LLM.from_pretrained(None, device="cpu", dtype=fmt["dtype"], engine_config=config)
    out: dict = {"fused": llm.engine.runner.fused is not None}
    if spec["task"] == "decode":
        prompt, n = ids[: spec["prompt"]], spec["new_tokens"]
        llm.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm up
        _reset_peak()
        rates = {}
        for loaded in spec["loads"]:
            with _Spinner(loaded):
                start = time.perf_counter()
                llm.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
                first = time.perf_counter() - start
                start = time.perf_counter()
                llm.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))
                rates["loaded" if loaded else "quiet"] = _decode_rate(first, time.perf_counter() - start, n)
        out |= {"rates": rates, "peak": _rss("VmHWM"), "base": base}
    elif spec["task"] == "prefill":
        times = {}
        llm.generate([ids[:64]], SamplingParams(max_new_tokens=1))
        for p in spec["lengths"]:
            for loaded in spec["loads"]:
                with _Spinner(loaded):
                    start = time.perf_counter()
                    llm.generate([prefill_prompt(ids, spec, p, loaded)], SamplingParams(max_new_tokens=1))
                    times[f"{p}/{'loaded' if loaded else 'quiet'}"] = time.perf_counter() - start
        out["seconds"] = times
    else:
        result = perplexity(llm.engine.runner.model, ids[: spec["ppl_tokens"]], spec["context"])
        out |= {"ppl": result.perplexity, "stderr": result.stderr, "scored": result.scored_tokens}
    del torch
    return out


def worker_llama(spec: dict) -> dict:
    base = _rss("VmRSS")
    import numpy as np
    from llama_cpp import Llama

    base = max(base, _rss("VmRSS"))
    ids = json.loads(Path(spec["tokens"]).read_text())
    task = spec["task"]
    n_ctx = spec["context"] if task == "ppl" else max(*spec.get("lengths", [0]), spec.get("prompt", 0) + 512)
    llm = Llama(
        spec["gguf"], n_ctx=n_ctx, n_batch=512, n_threads=spec["threads"], logits_all=task == "ppl", verbose=False
    )
    out: dict = {}
    if task == "decode":
        prompt, n = ids[: spec["prompt"]], spec["new_tokens"]

        def run(count: int) -> float:
            start = time.perf_counter()
            for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
                if i == count:
                    break
            return time.perf_counter() - start

        run(8)
        _reset_peak()
        rates = {}
        for loaded in spec["loads"]:
            with _Spinner(loaded):
                first = run(1)
                rates["loaded" if loaded else "quiet"] = _decode_rate(first, run(n), n)
        out |= {"rates": rates, "peak": _rss("VmHWM"), "base": base}
    elif task == "prefill":
        times = {}
        for p in spec["lengths"]:
            for loaded in spec["loads"]:
                with _Spinner(loaded):
                    llm.reset()
                    start = time.perf_counter()
                    llm.eval(prefill_prompt(ids, spec, p, loaded))
                    times[f"{p}/{'loaded' if loaded else 'quiet'}"] = time.perf_counter() - start
        out["seconds"] = times
    else:
        context, nll = spec["context"], []
        for start, first in spec["windows"]:  # minicpm.eval.perplexity's plan, made by the driver
            window = ids[start : start + context]
            llm.reset()
            llm.eval(window)
            logits = np.array(llm.scores[: context - 1], dtype=np.float64)[first - 1 :]
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            nll.extend(-logp[np.arange(len(logp)), window[first:]])
        values = np.array(nll)
        ppl = float(np.exp(values.mean()))
        out |= {"ppl": ppl, "stderr": ppl * float(values.std(ddof=1)) / len(values) ** 0.5, "scored": len(values)}
    return out


def worker_vllm(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    ids = json.loads(Path(spec["tokens"]).read_text())
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=max(spec["lengths"]) + 16, enforce_eager=True)
    params = SamplingParams(max_tokens=1)
    llm.generate({"prompt_token_ids": ids[:64]}, params, use_tqdm=False)
    times = {}
    for p in spec["lengths"]:
        for loaded in spec["loads"]:
            with _Spinner(loaded):
                start = time.perf_counter()
                llm.generate({"prompt_token_ids": prefill_prompt(ids, spec, p, loaded)}, params, use_tqdm=False)
                times[f"{p}/{'loaded' if loaded else 'quiet'}"] = time.perf_counter() - start
    return {"seconds": times}


WORKERS = {"minicpm": worker_minicpm, "llama.cpp": worker_llama, "vllm": worker_vllm}


# ------------------------------------------------------------------------------------- driver
def run_worker(python: str, spec: dict, timeout: float = 1800) -> dict:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    what = f"{spec['system']} {spec.get('format') or spec.get('dtype') or ''} {spec['task']}"
    answers = [line[len(MARK) :] for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not answers:
        raise RuntimeError(f"{what} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
    print(f"{what}: {answers[-1]}", file=sys.stderr, flush=True)
    return json.loads(answers[-1])


def botchan(cache: Path) -> Path:
    """The first 100 kB of Botchan from sentencepiece's source archive (fetched once)."""
    target = cache / "botchan100k.txt"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                "sentencepiece==0.2.1",
                "-d",
                tmp,
            ],
            check=True,
            capture_output=True,
        )
        import tarfile

        archive = next(Path(tmp).glob("sentencepiece-*.tar.gz"))
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/test/botchan.txt"))
            text = tar.extractfile(member).read()[:100_000]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text)
    return target


def peer_ggufs(cache: Path, llama_python: str) -> dict[str, Path]:
    """llama.cpp's files for each format, written from the shipped GGUF's weights (once)."""
    from gguf_peer import write_dequantized

    from minicpm.default_model import default_gguf

    shipped = default_gguf()
    out = {"shipped": shipped}
    for name in ("f32", "bf16"):
        out[name] = write_dequantized(shipped, cache / f"smollm2.{name}.gguf", name)
    for name, ftype in (("Q8_0", 7), ("Q4_1", 3)):
        target = cache / f"smollm2.{name}.gguf"
        if not target.exists():
            code = (
                "import llama_cpp, sys\n"
                "p = llama_cpp.llama_model_quantize_default_params()\n"
                f"p.ftype = {ftype}\n"
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
            )
            tmp = target.with_suffix(".partial")
            subprocess.run([llama_python, "-c", code, str(out["f32"]), str(tmp)], check=True, capture_output=True)
            os.replace(tmp, target)
        out[name] = target
    return out


def median_range(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--llama-python",
        default=sys.executable,
        help="python with llama-cpp-python (default: this one; none: no llama.cpp)",
    )
    p.add_argument("--vllm-python", default=None, help="python with vllm-cpu: also its prefill")
    p.add_argument("--formats", nargs="+", default=list(OURS), choices=list(OURS))
    p.add_argument("--rounds", type=int, default=3, help="rounds of the decode measurements")
    p.add_argument("--prefill-rounds", type=int, default=1, help="rounds of the prefill ones (minutes each)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    p.add_argument("--prefill", type=int, nargs="+", default=[2048, 8000])
    p.add_argument("--context", type=int, default=512, help="perplexity window")
    p.add_argument("--ppl-tokens", type=int, default=None, help="tokens of the text scored (default: all)")
    p.add_argument("--text", default=None, help="text for perplexity and prompts (default: Botchan, 100 kB)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    p.add_argument("--tasks", nargs="+", default=["decode", "ppl", "prefill"], choices=["decode", "ppl", "prefill"])
    p.add_argument("--tiny", action="store_true", help="a quick run at small sizes (tests)")
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(MARK + json.dumps(WORKERS[spec["system"]](spec)), flush=True)
        return
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from minicpm import Tokenizer
    from minicpm.default_model import cache_root, default_model_path
    from minicpm.eval.perplexity import window_plan

    if args.tiny:
        args.rounds, args.new_tokens, args.prompt, args.prefill, args.context = 1, 8, 16, [128], 64
        args.prefill_rounds = 1
        args.ppl_tokens = args.ppl_tokens or 256
        args.formats = [f for f in args.formats if f in ("float32", "shipped")]
    cache = cache_root() / "bench"
    text = Path(args.text) if args.text else (HERE.parent / "README.md" if args.tiny else botchan(cache))
    tokenizer = Tokenizer.from_pretrained(default_model_path())
    ids = tokenizer.encode(text.read_text(encoding="utf-8"))
    tokens = cache / f"tokens-{os.getpid()}.json"
    tokens.parent.mkdir(parents=True, exist_ok=True)
    tokens.write_text(json.dumps(ids))
    need = max(256 + 2 * sum(args.prefill), args.prompt + args.new_tokens)
    if len(ids) < need:
        raise SystemExit(f"the text is {len(ids)} tokens; the prefill and decode sizes need {need}")
    llama = args.llama_python != "none" and has_module(args.llama_python, "llama_cpp")
    vllm = args.vllm_python is not None and has_module(args.vllm_python, "vllm")
    common = {"tokens": str(tokens), "threads": args.threads, "prompt": args.prompt, "new_tokens": args.new_tokens}
    common |= {
        "context": args.context,
        "ppl_tokens": min(args.ppl_tokens or len(ids), len(ids)),
        "lengths": args.prefill,
    }
    common["windows"] = window_plan(common["ppl_tokens"], args.context, args.context)
    try:
        ggufs = peer_ggufs(cache, args.llama_python) if llama else {}
        report = measure(args, common, ggufs, llama, vllm)
    finally:
        tokens.unlink(missing_ok=True)
    report |= {"benchmark": "cpu_formats", "tiny": args.tiny, "text_tokens": len(ids), "llama.cpp": llama, "vllm": vllm}
    print_table(report)
    print(json.dumps(report))


def measure(args: argparse.Namespace, common: dict, ggufs: dict, llama: bool, vllm: bool) -> dict:
    from gguf_peer import float_checkpoint

    decode: dict[str, dict[str, list]] = {f: {"minicpm": [], "llama.cpp": []} for f in args.formats}
    memory: dict[str, dict[str, list]] = {f: {"minicpm": [], "llama.cpp": []} for f in args.formats}
    loaded_rates: dict[str, dict[str, list]] = {s: {"quiet": [], "loaded": []} for s in ("minicpm", "llama.cpp")}
    fused = {}
    for _ in range(args.rounds if "decode" in args.tasks else 0):
        for fmt in args.formats:
            loads = [False, True] if fmt == "shipped" else [False]
            spec = common | {"system": "minicpm", "format": fmt, "task": "decode", "loads": loads}
            systems = [("minicpm", sys.executable, spec)]
            if llama:
                peer = common | {"system": "llama.cpp", "gguf": str(ggufs[PEER[fmt]]), "task": "decode", "loads": loads}
                systems.append(("llama.cpp", args.llama_python, peer))
            for name, python, s in systems:
                r = run_worker(python, s)
                decode[fmt][name].append(r["rates"]["quiet"])
                memory[fmt][name].append((r["peak"], r["peak"] - r["base"]))
                fused[fmt] = r.get("fused", fused.get(fmt))
                if "loaded" in r["rates"]:
                    loaded_rates[name]["quiet"].append(r["rates"]["quiet"])
                    loaded_rates[name]["loaded"].append(r["rates"]["loaded"])
    ppl = {}
    for fmt in args.formats if "ppl" in args.tasks else []:
        ppl[fmt] = {"minicpm": run_worker(sys.executable, common | {"system": "minicpm", "format": fmt, "task": "ppl"})}
        if llama:
            spec = common | {"system": "llama.cpp", "gguf": str(ggufs[PEER[fmt]]), "task": "ppl"}
            ppl[fmt]["llama.cpp"] = run_worker(args.llama_python, spec)
    prefill: dict[str, list[dict]] = {}
    prefill_formats = [f for f in ("shipped", "float32", "bfloat16") if f in args.formats]
    for round_ in range(args.prefill_rounds if "prefill" in args.tasks else 0):
        for fmt in prefill_formats:
            spec = common | {"system": "minicpm", "format": fmt, "task": "prefill", "loads": [False, True]}
            prefill.setdefault(f"minicpm {fmt}", []).append(run_worker(sys.executable, spec)["seconds"])
            if llama:
                spec = common | {
                    "system": "llama.cpp",
                    "gguf": str(ggufs[PEER[fmt]]),
                    "task": "prefill",
                    "loads": [False, True],
                }
                prefill.setdefault(f"llama.cpp {PEER[fmt]}", []).append(run_worker(args.llama_python, spec)["seconds"])
        if vllm and round_ == 0:  # one round: its start-up alone takes a minute
            for dtype in ("bfloat16", "float32"):
                spec = common | {"system": "vllm", "task": "prefill", "loads": [False, True], "dtype": dtype}
                spec["model"] = str(float_checkpoint())
                prefill.setdefault(f"vLLM {dtype}", []).append(run_worker(args.vllm_python, spec)["seconds"])
    return summarize(args, decode, memory, loaded_rates, ppl, prefill, fused)


def summarize(args, decode, memory, loaded_rates, ppl, prefill, fused) -> dict:
    out: dict = {"decode": {}, "memory": {}, "perplexity": {}, "prefill": {}, "loaded": {}, "targets": {}}
    for fmt, by in decode.items():
        if not by["minicpm"]:
            continue
        row = {name: median_range(v) for name, v in by.items() if v}
        if "llama.cpp" in row:
            row["ratio"] = row["minicpm"]["median"] / row["llama.cpp"]["median"]
        row["fused"] = fused.get(fmt)
        out["decode"][fmt] = row
        mem = {}
        for name, v in memory[fmt].items():
            if v:
                mem[name] = {
                    "peak_bytes": statistics.median(x[0] for x in v),
                    "model_bytes": statistics.median(x[1] for x in v),
                }
        if "llama.cpp" in mem:
            mem["ratio_model_bytes"] = mem["minicpm"]["model_bytes"] / mem["llama.cpp"]["model_bytes"]
        out["memory"][fmt] = mem
    for fmt, by in ppl.items():
        out["perplexity"][fmt] = {name: {k: r[k] for k in ("ppl", "stderr", "scored")} for name, r in by.items()}
    for name, runs in prefill.items():
        out["prefill"][name] = {key: median_range([r[key] for r in runs]) for key in runs[0]}
    for name, by in loaded_rates.items():
        if by["quiet"]:
            q, lo = statistics.median(by["quiet"]), statistics.median(by["loaded"])
            out["loaded"][name] = {"quiet": q, "loaded": lo, "kept": lo / q}
    t = out["targets"]
    for fmt, peer in (("float32", "f32"), ("bfloat16", "bf16"), ("int4", "Q4_1"), ("shipped", "shipped")):
        if "ratio" in out["decode"].get(fmt, {}):
            t[f"decode_{fmt}_vs_llama.cpp_{peer}"] = out["decode"][fmt]["ratio"] >= 1.0
    pp = out["perplexity"]
    if "int8" in pp and "float32" in pp:
        t["ppl_int8_within_0.5pct_of_float32"] = pp["int8"]["minicpm"]["ppl"] <= 1.005 * pp["float32"]["minicpm"]["ppl"]
    if all(f in pp and "llama.cpp" in pp[f] for f in ("int4", "float32")):
        ours = pp["int4"]["minicpm"]["ppl"] / pp["float32"]["minicpm"]["ppl"]
        theirs = pp["int4"]["llama.cpp"]["ppl"] / pp["float32"]["llama.cpp"]["ppl"]
        t["ppl_int4_loss_at_most_llama.cpp_Q4_1"] = ours <= theirs
    for fmt, mem in out["memory"].items():
        if "ratio_model_bytes" in mem:
            t[f"memory_{fmt}_within_20pct"] = mem["ratio_model_bytes"] <= 1.2
    if "minicpm" in out["loaded"]:
        t["decode_loaded_at_least_half_quiet"] = out["loaded"]["minicpm"]["kept"] >= 0.5
    ours = [v for k, v in out["prefill"].items() if k.startswith("minicpm")]
    peers = [v for k, v in out["prefill"].items() if not k.startswith("minicpm")]
    if ours and peers:  # our fastest format against the fastest peer (each row of the table names its format)
        for key in ours[0]:
            best = min(peer[key]["median"] for peer in peers if key in peer)
            t[f"prefill_{key}_at_least_the_fastest_peer"] = min(o[key]["median"] for o in ours if key in o) <= best
    return out


def print_table(r: dict) -> None:
    head = ("format", "minicpm tok/s", "llama.cpp tok/s", "ratio", "model MB (ours/theirs)", "ppl ours", "ppl theirs")
    print("{:<10} {:>14} {:>16} {:>6} {:>24} {:>9} {:>10}".format(*head))
    for fmt, row in r["decode"].items():
        ours = row["minicpm"]["median"]
        theirs = row.get("llama.cpp", {}).get("median")
        mem = r["memory"][fmt]
        mb = f"{mem['minicpm']['model_bytes'] / 1e6:.0f}" + (
            f"/{mem['llama.cpp']['model_bytes'] / 1e6:.0f}" if "llama.cpp" in mem else ""
        )
        pp = r["perplexity"].get(fmt, {})
        ppl_theirs = f"{pp['llama.cpp']['ppl']:.3f}" if "llama.cpp" in pp else "-"
        print(
            f"{fmt:<10} {ours:>14.1f} {theirs if theirs is None else round(theirs, 1)!s:>16} "
            f"{row.get('ratio', 0):>6.2f} {mb:>24} {pp.get('minicpm', {}).get('ppl', 0):>9.3f} {ppl_theirs:>10}"
        )
    for name, cells in r["prefill"].items():
        print(f"prefill {name:<22} " + "  ".join(f"{k}: {v['median']:.2f} s" for k, v in cells.items()))
    for name, v in r["loaded"].items():
        print(f"decode {name}: quiet {v['quiet']:.1f} tok/s, one core busy {v['loaded']:.1f} ({v['kept']:.0%})")
    for name, ok in r["targets"].items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
