"""Batch-1 greedy decode speed on CPU: minicpm's LLM vs Hugging Face transformers, same weights.

Runs both on the embedded default model (SmolLM2-135M-Instruct, converted from the GGUF) or on
--model DIR, in float32 and bfloat16, with the prompt and rate definition of
shared/facts/performance-anchors.md: rate = (N - 1) / (time for N tokens - time for 1 token).
Exits non-zero if the float32 greedy tokens differ from transformers' (bf16 rounding may diverge).
Prints a table, then one JSON object.

    python benchmarks/cpu_decode.py [--model DIR] [--new-tokens 128] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minicpm import LLM, SamplingParams, Tokenizer

PROMPT = "Once upon a time, in a small village at the edge of a great forest,"


def decode_rate(generate: Callable[[int], list[int]], n: int) -> tuple[float, list[int]]:
    """(N - 1) / (time for N tokens - time for 1 token), after one warm-up; and the N tokens."""
    generate(1)
    start = time.perf_counter()
    generate(1)
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate(n)
    tn = time.perf_counter() - start
    return (n - 1) / (tn - t1), tokens


def measure_minicpm(path: Path, dtype: str, ids: list[int], n: int) -> tuple[float, list[int]]:
    llm = LLM.from_pretrained(path, dtype=dtype, device="cpu")
    return decode_rate(lambda k: llm.generate(ids, SamplingParams(max_new_tokens=k, ignore_eos=True)).token_ids, n)


def measure_hf(path: Path, dtype: str, ids: list[int], n: int, pad_id: int | None) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    x = torch.tensor([ids])

    def generate(k: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=pad_id)
        return out[0, len(ids) :].tolist()

    return decode_rate(generate, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    from minicpm.default_model import default_model_path

    path = Path(args.model) if args.model else default_model_path()
    n = args.new_tokens
    tokenizer = Tokenizer.from_pretrained(path)
    ids = tokenizer.encode(PROMPT)
    rows, results = [], {}
    for dtype in args.dtypes:
        ours, ours_tokens = measure_minicpm(path, dtype, ids, n)
        theirs, hf_tokens = measure_hf(path, dtype, ids, n, tokenizer.eos_token_id)
        prefix = next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=False)) if a != b), n)
        rows.append((dtype, ours, theirs, ours / theirs, prefix))
        results[dtype] = {
            "minicpm_tok_s": round(ours, 2),
            "hf_tok_s": round(theirs, 2),
            "ratio": round(ours / theirs, 2),
            "same_greedy_prefix": prefix,
        }
    print(f"batch-1 greedy decode, {n} new tokens, {torch.get_num_threads()} threads, model {path}")
    print(f"{'dtype':<10}{'minicpm tok/s':>15}{'HF tok/s':>10}{'ratio':>8}{'same greedy prefix':>20}")
    for dtype, ours, theirs, ratio, prefix in rows:
        print(f"{dtype:<10}{ours:>15.1f}{theirs:>10.1f}{ratio:>8.2f}{prefix:>16}/{n}")
    summary = {"benchmark": "cpu_decode", "new_tokens": n, "threads": torch.get_num_threads(), "results": results}
    print(json.dumps(summary))
    if "float32" in results and results["float32"]["same_greedy_prefix"] < n:
        raise SystemExit("float32 greedy tokens differ from transformers: the speed comparison is not like for like")


if __name__ == "__main__":
    main()
