"""Time to first token of a question about a long document, before and after a restart, with the
persistent prefix cache (``--kv-cache-dir``).

Two fresh child processes, one after the other, each loading the model and opening the same
directory (empty before the first): each submits the document (``--tokens`` tokens of the Paul
Graham essays the needle eval uses, or of generated text where they are not installed) followed
by a question, and measures the time from submitting the request to its first token. The first
computes the whole prompt and stores its full blocks (written by the store's thread, then
flushed at close: that time is reported apart); the second reads them from disk and computes the
question. The target: the second time to first token at most ``--target`` (5%) of the first.
Prints both runs, the ratio, then one JSON object as the last line; exits 1 where the target is
missed.

The prompt is cut to fit the model's context (the embedded SmolLM2-135M-Instruct holds 8192
tokens: pass ``--model`` a long-context checkpoint, e.g. MiniCPM-2B-128k, for 16k and more).

    python benchmarks/prefix_store.py [--model DIR] [--tokens 16384] [--dtype float32] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "\n\nQuestion: what is the single most important idea of the text above? Answer:"


def document_ids(tokenizer: object, tokens: int) -> list[int]:
    """``tokens`` ids of the needle eval's essays (repeated), or of numbered sentences without them."""
    try:
        from minicpm.eval.needle import haystack_text

        text = haystack_text()
    except (FileNotFoundError, ImportError):
        text = "".join(
            f"Sentence {i} of the report says that item {i * 7 % 101} weighs {i % 13} kg. " for i in range(4000)
        )
    ids = tokenizer.encode(text)
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def child(args: argparse.Namespace) -> dict:
    """One run: load, time the first token, close (the queued writes); a dict of figures."""
    import torch

    from minicpm import MiniCPMForCausalLM, SamplingParams, Tokenizer
    from minicpm.default_model import resolve_model_path
    from minicpm.engine import EngineConfig, LLMEngine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(args.model)
    start = time.perf_counter()
    quantize = "auto" if device == "cpu" else "none"  # as LLM.from_pretrained loads it
    model = MiniCPMForCausalLM.from_pretrained(path, dtype=args.dtype, device=device, quantize=quantize)
    tokenizer = Tokenizer.from_pretrained(path)
    engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_dir=args.dir))
    load_s = time.perf_counter() - start
    question = tokenizer.encode(QUESTION)
    room = engine.max_model_len - len(question) - args.new_tokens
    ids = document_ids(tokenizer, min(args.tokens, room)) + question
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    admit, admitting = engine.scheduler.on_admit, [0.0]

    def timed_admit(seq: object) -> object:  # the store's part of the first token: reads and copies
        start = time.perf_counter()
        try:
            return admit(seq)
        finally:
            admitting[0] += time.perf_counter() - start

    engine.scheduler.on_admit = timed_admit
    request = engine.make_request(ids, params)
    start = time.perf_counter()
    engine.add(request)
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.token_ids:
                first = time.perf_counter() - start
    start = time.perf_counter()
    engine.close()
    close_s = time.perf_counter() - start
    s = engine.stats()
    return {
        "prompt_tokens": len(ids),
        "ttft_s": first,
        "load_s": load_s,
        "store_read_s": admitting[0],
        "close_s": close_s,
        "cached_tokens": s["cached_prompt_tokens"],
        **{k: v for k, v in s.items() if k.startswith("kv_store_")},
        "attention_backend": s["attention_backend"],
        "block_size": s["block_size"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--tokens", type=int, default=16384, help="document tokens (cut to the context)")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dir", default=None, help="the store's directory, emptied first (default: a temporary one)")
    parser.add_argument("--target", type=float, default=0.05, help="second TTFT / first TTFT at most this")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="minicpm-prefix-store-") as tmp:
        directory = Path(args.dir or tmp)
        if directory.exists() and any(directory.iterdir()):
            raise SystemExit(f"{directory} is not empty: give an empty (or new) --dir")
        argv = [sys.executable, __file__, "--child", "--dir", str(directory), "--tokens", str(args.tokens)]
        argv += ["--new-tokens", str(args.new_tokens)]
        for flag in ("model", "dtype", "device"):
            if getattr(args, flag) is not None:
                argv += [f"--{flag}", str(getattr(args, flag))]
        runs = []
        for name in ("first", "second"):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"the {name} run failed (exit {done.returncode})")
            runs.append(json.loads(done.stdout.splitlines()[-1]))
            r = runs[-1]
            print(
                f"{name:>6} run: {r['prompt_tokens']} prompt tokens, first token in {r['ttft_s']:.3f} s "
                f"({r['cached_tokens']} tokens read from disk: {r['kv_store_hits']} blocks, "
                f"in {r['store_read_s']:.2f} s); "
                f"load {r['load_s']:.1f} s, "
                f"{r['kv_store_writes']} blocks written by close ({r['close_s']:.2f} s after the answer)"
            )
            size = r["kv_store_bytes"]
    ratio = runs[1]["ttft_s"] / runs[0]["ttft_s"]
    ok = ratio <= args.target
    print(f"second / first time to first token: {ratio:.2%} (target <= {args.target:.0%}): {'met' if ok else 'MISSED'}")
    print(json.dumps({"runs": runs, "ratio": ratio, "target": args.target, "met": ok, "store_bytes": size}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
