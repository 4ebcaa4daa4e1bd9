"""CPU benchmark of the engine against Hugging Face transformers on the same weights, same run.

For each model (the embedded default, SmolLM2-135M-Instruct; and a tiny MiniCPM with random
weights and the real 122,760-token vocabulary) and dtype (float32, bfloat16):

* batch-1 greedy decode tokens/s: rate = (N - 1) / (time for N tokens - time for 1 token), so
  prefill is left out; HF is ``generate``;
* batch-16 decode throughput: 16 requests together, 16 (N - 1) / (time for N - time for 1), against
  HF's batch-1 rate (the target is >= 8x);
* prefill tokens/s at 512 / 2k / 8k prompt tokens (time to the first token; HF: one forward with
  ``logits_to_keep=1``).

Exits non-zero if the default model's float32 greedy tokens differ from transformers' (the
comparison would not be like for like). Prints a table, then one JSON object.

    python benchmarks/cpu_engine.py [--models default tiny-minicpm] [--dtypes float32 bfloat16]
        [--new-tokens 128] [--prefill 512 2048 8192] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable

import torch
from hf_peer import hf_llama

from minicpm import MiniCPMConfig, MiniCPMForCausalLM, SamplingParams, Tokenizer
from minicpm.config import MINICPM_2B_128K
from minicpm.default_model import default_model_path
from minicpm.engine import EngineConfig, LLMEngine

PROMPT = "Once upon a time, in a small village at the edge of a great forest,"
TARGETS = {"decode_b1_vs_hf": 3.0, "decode_b16_vs_hf_b1": 8.0}


def tiny_minicpm() -> MiniCPMForCausalLM:
    """MiniCPM-2B-128k's config (real vocabulary, scales, dynamic NTK) at a tiny width and depth."""
    sizes = {
        "hidden_size": 256,
        "intermediate_size": 640,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "dim_model_base": 64,
    }
    config = MiniCPMConfig.from_dict(MINICPM_2B_128K | sizes)
    torch.manual_seed(0)
    model = MiniCPMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return model.eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rate(run: Callable[[int], object], n: int, per_step: int = 1) -> float:
    """per_step * (n - 1) / (time for n tokens - time for 1), after one warm-up."""
    run(2)
    t1 = timed(lambda: run(1))
    tn = timed(lambda: run(n))
    return per_step * (n - 1) / (tn - t1)


def measure(name: str, model: MiniCPMForCausalLM, prompt: list[int], args: argparse.Namespace) -> dict:
    n = args.new_tokens
    context = model.config.context_length
    hf = hf_llama(model)  # first: the engine fuses (and on CPU bf16 packs) the model's layers in place
    engine = LLMEngine(model, None, EngineConfig.for_device("cpu"))
    vocab = model.config.vocab_size
    out: dict = {}

    def ours_generate(prompts: list[list[int]], k: int) -> list[list[int]]:
        params = SamplingParams(max_new_tokens=k, ignore_eos=True)
        return [c.token_ids for c in engine.generate(prompts, params)]

    def hf_generate(ids: list[list[int]], k: int) -> list[list[int]]:
        x = torch.tensor(ids)
        with torch.inference_mode():
            y = hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        return y[:, x.shape[1] :].tolist()

    engine.block_manager.enable_prefix_caching = False  # every run computes its prompt
    ours_tokens = ours_generate([prompt], n)[0]
    hf_tokens = hf_generate([prompt], n)[0]
    same = next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=False)) if a != b), n)
    b1_ours = rate(lambda k: ours_generate([prompt], k), n)
    b1_hf = rate(lambda k: hf_generate([prompt], k), n)
    out["decode_b1"] = {"ours_tok_s": b1_ours, "hf_tok_s": b1_hf, "ratio": b1_ours / b1_hf, "same_greedy_prefix": same}
    batch = [[*prompt[:-1], (prompt[-1] + i) % vocab] for i in range(16)]
    b16 = rate(lambda k: ours_generate(batch, k), n, per_step=16)
    out["decode_b16"] = {"ours_tok_s": b16, "hf_b1_tok_s": b1_hf, "ratio_vs_hf_b1": b16 / b1_hf}
    out["prefill"] = {}
    gen = torch.Generator().manual_seed(0)
    for length in args.prefill:
        length = min(length, context - 1)
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        x = torch.tensor([ids])
        ours_times, hf_times = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            ours_times.append(timed(lambda ids=ids: ours_generate([ids], 1)))
            with torch.inference_mode():
                hf_times.append(timed(lambda x=x: hf(x, logits_to_keep=1)))
        ours, theirs = min(ours_times), min(hf_times)
        out["prefill"][str(length)] = {
            "ours_tok_s": length / ours,
            "hf_tok_s": length / theirs,
            "ratio": theirs / ours,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default", "tiny-minicpm"], choices=["default", "tiny-minicpm"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, prefill 256/512, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.prefill, args.repeats = 16, [256, 512], 1

    results: dict = {}
    for name in args.models:
        for dtype in args.dtypes:
            if name == "default":
                path = default_model_path()
                model = MiniCPMForCausalLM.from_pretrained(path, dtype=dtype, device="cpu", quantize="none")
                prompt = Tokenizer.from_pretrained(path).encode(PROMPT)
            else:
                model = tiny_minicpm().to(getattr(torch, dtype))
                prompt = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(1))
                prompt = prompt.tolist()
            results.setdefault(name, {})[dtype] = measure(name, model, prompt, args)
            del model
            gc.collect()

    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; HF transformers on the same weights")
    print(f"{'model':<14}{'dtype':<10}{'figure':<22}{'ours':>10}{'HF':>10}{'ratio':>8}  target")
    for name, per_dtype in results.items():
        for dtype, r in per_dtype.items():
            d1, d16 = r["decode_b1"], r["decode_b16"]
            rows = [
                ("decode b1 tok/s", d1["ours_tok_s"], d1["hf_tok_s"], d1["ratio"], ">= 3x"),
                ("decode b16 tok/s", d16["ours_tok_s"], d16["hf_b1_tok_s"], d16["ratio_vs_hf_b1"], ">= 8x HF b1"),
            ]
            rows += [
                (f"prefill {k} tok/s", p["ours_tok_s"], p["hf_tok_s"], p["ratio"], "") for k, p in r["prefill"].items()
            ]
            for figure, ours, theirs, ratio, target in rows:
                print(f"{name:<14}{dtype:<10}{figure:<22}{ours:>10.1f}{theirs:>10.1f}{ratio:>8.2f}  {target}")
            print(f"{name:<14}{dtype:<10}same greedy tokens as HF: {d1['same_greedy_prefix']}/{args.new_tokens}")
    summary = {
        "benchmark": "cpu_engine",
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "targets": TARGETS,
        "results": json.loads(json.dumps(results, default=float), parse_float=lambda v: round(float(v), 3)),
    }
    print(json.dumps(summary))
    default32 = results.get("default", {}).get("float32")
    if default32 and default32["decode_b1"]["same_greedy_prefix"] < args.new_tokens:
        raise SystemExit("float32 greedy tokens differ from transformers: the speed comparison is not like for like")


if __name__ == "__main__":
    main()
