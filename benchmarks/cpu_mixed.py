"""The CPU engine under a server's load: decode steps beside prefill chunks, long contexts,
scattered blocks, and an older commit of this project as the peer (same machine, same run).

Cases (each runs in its own process, so a case's memory is gone before the next; peers alternate
A, B, A, B over ``--rounds``):

* ``decode``: 16 sequences decoding at ``--contexts`` (2k and 16k by default); a step's time and
  16 / step tokens/s.
* ``mixed``: the same, with a 512-token prefill chunk of a new prompt in every other step; the
  target: a mixed step costs at most the decode-only step plus the chunk's own time (a step with
  the chunk alone) + 10%.
* ``scatter``: one sequence decoding at 16k with its blocks consecutive, then shuffled (the same
  blocks in another order), alternating step by step; target: shuffled at most 10% slower.
* ``--peer REV`` runs ``decode`` at the first context with the project at git revision REV too
  (a detached worktree next to the repository); target: at least 3x its batch-16 rate.

The default model (SmolLM2-135M) was trained to 8192 positions; for longer cases its config's
``max_length`` is raised in the benchmark process (the text past 8192 would be poor; the time a
step takes is what is measured). Sequences reach their context without running the model: the
runner is stubbed for the setup and the cache blocks they use are filled with random values (what
a step reads is what a real context would make it read). Prefix caching is off. Prints a table,
then one JSON object.

    python benchmarks/cpu_mixed.py [--dtype float32] [--contexts 2048 16384] [--rounds 3]
        [--steps 6] [--peer cadd124]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH, CHUNK = 16, 512


def build_engine(dtype: str, contexts: list[int], seqs: int):
    import torch

    from minicpm import MiniCPMForCausalLM
    from minicpm.default_model import default_model_path
    from minicpm.engine import EngineConfig, LLMEngine

    try:  # float weights, like the peer revision's (which may predate quantized loading)
        model = MiniCPMForCausalLM.from_pretrained(default_model_path(), dtype=dtype, quantize="none")
    except TypeError:
        model = MiniCPMForCausalLM.from_pretrained(default_model_path(), dtype=dtype)
    longest = max(contexts) + 1024
    if model.config.context_length < longest:  # timing only: positions past its training are fine here
        model.config = dataclasses.replace(model.config, max_length=longest)
    per_token = model.config.kv_bytes_per_token(torch.empty(0, dtype=model.dtype).element_size())
    tokens = seqs * (max(contexts) + 256) + 2 * CHUNK + 1024
    config = EngineConfig(
        max_num_seqs=seqs + 1,
        max_num_batched_tokens=seqs + CHUNK,
        kv_cache_memory=tokens * per_token,
        max_model_len=longest,
        enable_prefix_caching=False,
    )
    return LLMEngine(model, None, config)


def fake_prefill(engine, prompts: list[list[int]], new_tokens: int) -> None:
    """Admit ``prompts`` and bring each to its first decode step without running the model."""
    from minicpm import SamplingParams
    from minicpm.engine.sampler import Sampled

    def stub(batch):
        ends = [
            s for s, n in zip(batch.seqs, batch.num_tokens, strict=True) if s.num_computed_tokens + n == s.num_tokens
        ]
        return [Sampled(1) for _ in ends]

    real_run, budget = engine.runner.run, engine.scheduler.max_num_batched_tokens
    engine.runner.run, engine.scheduler.max_num_batched_tokens = stub, 1 << 30
    try:
        for prompt in prompts:
            engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        while any(s.num_uncomputed > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
    finally:
        engine.runner.run, engine.scheduler.max_num_batched_tokens = real_run, budget
    cache = engine.runner.cache
    used = sorted({b for s in engine.scheduler.running for b in s.block_table})
    for layer in range(cache.k.shape[0]):  # touch what the steps will read: random keys and values
        for b in used:
            cache.k[layer, b].normal_(0, 0.5)
            cache.v[layer, b].normal_(0, 0.5)


def timed_step(engine) -> float:
    start = time.perf_counter()
    engine.step()
    return time.perf_counter() - start


def case_decode(args: argparse.Namespace, context: int) -> dict:
    engine = build_engine(args.dtype, [context], BATCH)
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(context)] for i in range(BATCH)]
    fake_prefill(engine, prompts, args.steps * 4 + 8)
    timed_step(engine)  # warm up
    times = [timed_step(engine) for _ in range(args.steps)]
    step = statistics.median(times)
    return {"step_ms": 1000 * step, "tok_s": BATCH / step}


def case_mixed(args: argparse.Namespace, context: int) -> dict:
    from minicpm import SamplingParams

    engine = build_engine(args.dtype, [context], BATCH)
    chunk = [[(11 * r + j) % 997 + 20 for j in range(CHUNK)] for r in range(2 * args.steps + 2)]
    once = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def chunk_step(i: int) -> float:
        engine.add_request(chunk[i], once)
        return timed_step(engine)  # the whole prompt in one step; it samples once and ends

    chunk_step(0)  # warm up
    alone = [chunk_step(1 + i) for i in range(args.steps)]
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(context)] for i in range(BATCH)]
    fake_prefill(engine, prompts, args.steps * 4 + 8)
    timed_step(engine)
    decode, mixed = [], []
    for i in range(args.steps):  # alternate: decode only, decode + chunk
        decode.append(timed_step(engine))
        mixed.append(chunk_step(1 + args.steps + i))
    d, m, c = (statistics.median(x) for x in (decode, mixed, alone))
    return {"decode_ms": 1000 * d, "mixed_ms": 1000 * m, "chunk_alone_ms": 1000 * c, "mixed_over_sum": m / (d + c)}


def case_scatter(args: argparse.Namespace, context: int) -> dict:
    import random

    engine = build_engine(args.dtype, [context], 1)
    fake_prefill(engine, [[(5 * j) % 1000 + 10 for j in range(context)]], 2 * args.steps + 8)
    seq = engine.scheduler.running[0]
    keep = len(seq.block_table) - 1  # the last block (where new tokens go) stays put
    ordered = sorted(seq.block_table[:keep])
    shuffled = ordered[:]
    random.Random(0).shuffle(shuffled)
    timed_step(engine)
    times: dict[str, list[float]] = {"consecutive": [], "scattered": []}
    for _ in range(args.steps):
        for name, order in (("consecutive", ordered), ("scattered", shuffled)):
            seq.block_table[:keep] = order  # the same blocks, another order: bookkeeping unchanged
            times[name].append(timed_step(engine))
    c, s = statistics.median(times["consecutive"]), statistics.median(times["scattered"])
    return {"consecutive_ms": 1000 * c, "scattered_ms": 1000 * s, "scattered_over_consecutive": s / c}


CASES = {"decode": case_decode, "mixed": case_mixed, "scatter": case_scatter}


def run_child(script: str, argv: list[str], tree: Path | None, what: str) -> dict:
    """``script`` with ``argv`` in a fresh process (with ``tree`` first on the path: a peer
    revision); the JSON object its last line prints. ``what`` names it if it fails."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run([sys.executable, script, *argv], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case: str, context: int, args: argparse.Namespace, tree: Path | None) -> dict:
    """One case in a fresh process (with ``tree`` first on the path: a peer revision)."""
    argv = ["--case", case, "--context", str(context), "--dtype", args.dtype, "--steps", str(args.steps)]
    return run_child(__file__, argv, tree, f"case {case} at {context}")


def peer_tree(rev: str) -> Path:
    tree = ROOT.parent / f"minicpm-peer-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True)
    return tree


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {
        f"{k}_range": [min(r[k] for r in runs), max(r[k] for r in runs)] for k in runs[0]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 16384])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per case and round (medians)")
    p.add_argument("--peer", default=None, metavar="REV", help="also run 'decode' at this git revision")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:  # a child process: one measurement, one JSON line
        import torch

        torch.manual_seed(0)
        print(json.dumps(CASES[args.case](args, args.context)))
        return

    tree = peer_tree(args.peer) if args.peer else None
    plan = [(c, n, None) for c in args.cases for n in (args.contexts if c != "scatter" else [max(args.contexts)])]
    if tree is not None:
        plan.insert(1, ("decode", args.contexts[0], tree))
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for case, context, where in plan:
            runs.setdefault((case, context, where), []).append(run_case(case, context, args, where))
    report: dict = {}
    for (case, context, where), results in runs.items():
        name = f"{case}@{context}" + (f"@{args.peer}" if where is not None else "")
        report[name] = median_of(results)
    targets = {}
    for context in args.contexts:
        mixed = report.get(f"mixed@{context}")
        if mixed:
            targets[f"mixed@{context}: mixed <= 1.1 x (decode + chunk)"] = mixed["mixed_over_sum"] <= 1.1
    scatter = report.get(f"scatter@{max(args.contexts)}")
    if scatter:
        targets["scattered <= 1.1 x consecutive"] = scatter["scattered_over_consecutive"] <= 1.1
    if tree is not None:
        ours, peer = report[f"decode@{args.contexts[0]}"], report[f"decode@{args.contexts[0]}@{args.peer}"]
        report["speedup_vs_peer"] = ours["tok_s"] / peer["tok_s"]
        targets[f"batch-16 decode at {args.contexts[0]} >= 3x {args.peer}"] = report["speedup_vs_peer"] >= 3
    print(f"{'case':28s} figures (medians of {args.rounds} rounds x {args.steps} steps)")
    for name, r in report.items():
        if isinstance(r, dict):
            shown = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if not k.endswith("_range"))
            print(f"{name:28s} {shown}")
    if "speedup_vs_peer" in report:
        print(f"batch-16 decode speed-up over {args.peer}: x{report['speedup_vs_peer']:.2f}")
    for target, met in targets.items():
        print(f"{'met' if met else 'NOT met':8s} {target}")
    print(json.dumps({"benchmark": "cpu_mixed", "settings": vars(args), "results": report, "targets": targets}))


if __name__ == "__main__":
    main()
