"""GPU speed and memory of minicpm's LLMEngine vs Hugging Face transformers, MiniCPM-2B-128k shape.

One run, random bfloat16 weights of the exact MiniCPM-2B-128k shape (speed and memory don't depend
on the values), built on the meta device and initialised on the GPU. Measured, for both ours
(``minicpm.engine.LLMEngine``, token-id prompts, no tokenizer) and the peer (transformers
``LlamaForCausalLM``, ``attn_implementation="sdpa"``, sharing the very same weight tensors):

* prefill: seconds to the first token and peak memory at 4k / 32k / 128k prompt tokens (ours: one
  request, time to first token; peak above weights + the preallocated KV pool. HF:
  ``model(ids, logits_to_keep=1, use_cache=True)``; peak above the weights, its KV cache included);
* batch-1 decode ms/token at 1k / 32k / 128k context: (t_last - t_first_token) / (N - 1);
* batch-32 decode throughput at 1k context, 128 new tokens each: tokens/s after every request has
  its first token;
* mixed load (ours): the same 32 requests decoding at 1k while a 32k prompt is prefilled in
  chunks of ``max_num_batched_tokens`` (8192 on GPU) in the same steps: the decoders'
  inter-token latency during the prefill (median and max over those steps) beside their
  decode-only inter-token latency, and the long prompt's time to first token;
* device-to-device copy bandwidth (bytes read + written), which scales the decode targets
  (:func:`targets`, set on an H200) to other cards.

Where a context is both prefilled and decoded, the prefill figure is the time to first token of the
decode request (the same computation). Prompts of the longest context are shortened so that
prompt + new tokens fit the model's 131072-token context; the tables give the real lengths.
HF runs first and is freed before the engine is built, so that the engine's KV pool (sized for the
longest request and for the batch case, whichever needs more) has the card to itself.
An out-of-memory error is recorded as "OOM" for that figure and the run goes on; any other error is
listed under "errors" (the figure is null) and makes the exit status 1. Prints tables, then one JSON
object as the last line (null where not measured). Without a GPU it refuses to run unless --tiny.

    python benchmarks/gpu_engine.py                   # the full run on an H100/H200, a few minutes
    python benchmarks/gpu_engine.py --skip-hf --contexts 1024 32768
    python benchmarks/gpu_engine.py --tiny --device cpu   # smoke run of every path, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import minicpm  # noqa: F401
except ImportError:  # a bare checkout (e.g. the GPU machine): import the package from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_peer import hf_llama

from minicpm import MiniCPMConfig, MiniCPMForCausalLM, SamplingParams
from minicpm.config import MINICPM_2B_128K
from minicpm.engine import EngineConfig, LLMEngine

GIB = 2**30
H200_COPY_TB_S = 4.21  # device-to-device copy on the H200 the targets were set on
OOM = "OOM"
HF_NOTE = (
    "HF LlamaForCausalLM runs the same weight tensors without MiniCPM's three scales (embedding x12, "
    "residual branches x0.221, final hidden state /9): elementwise multiplies that change neither speed "
    "nor memory"
)


# --------------------------------------------------------------------------- shapes
def full_config() -> MiniCPMConfig:
    """MiniCPM-2B-128k exactly (:data:`minicpm.config.MINICPM_2B_128K`)."""
    return MiniCPMConfig.from_dict(MINICPM_2B_128K)


def tiny_config() -> MiniCPMConfig:
    """Same structure (untied head, dynamic NTK past max_position_embeddings), a few thousand parameters."""
    return MiniCPMConfig.from_dict(
        MINICPM_2B_128K
        | {
            "vocab_size": 512,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "max_length": 1024,
            "dim_model_base": 16,
        }
    )


@dataclasses.dataclass
class Plan:
    prefill_contexts: list[int]
    decode_contexts: list[int]
    new_tokens: int  # ours, per decode measurement
    hf_new_tokens: int  # HF, per decode measurement (at most 16 above 32k)
    batch: int
    batch_context: int
    batch_new_tokens: int
    mixed_context: int  # the long prompt prefilled beside the batch's decoders (0 skips the case)


FULL_PLAN = Plan([4096, 32768, 131072], [1024, 32768, 131072], 64, 32, 32, 1024, 128, 32768)
TINY_PLAN = Plan([256, 512, 1024], [128, 512, 1024], 8, 4, 4, 128, 8, 512)


def build_model(config: MiniCPMConfig, device: torch.device, dtype: torch.dtype, seed: int) -> MiniCPMForCausalLM:
    """Built on the meta device, allocated on ``device`` in ``dtype``, N(0, 0.02) weights drawn there."""
    with torch.device("meta"):
        model = MiniCPMForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def build_hf(model: MiniCPMForCausalLM, device: torch.device) -> Any:
    """transformers' LlamaForCausalLM (SDPA) holding ``model``'s own weight tensors (no copy)."""
    hf = hf_llama(model, "sdpa", fold_scales=False)
    # transformers >= 5.2x names the cache argument `cache` (and warns on `past_key_values`); older ones don't
    hf.cache_arg = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
    return hf.eval()


def hf_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# --------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> int | None:
    """Reset the peak counter; returns the bytes allocated now (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def random_prompt(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    """``n`` random ids (none of the first three special ids); distinct per call: no prefix-cache hits."""
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


class Recorder:
    """Runs one measurement; an out-of-memory error becomes "OOM", another error is kept and reported."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.errors: list[str] = []

    def __call__(self, what: str, fn: Callable[[], Any], on_error: Callable[[], None] | None = None) -> Any:
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            print(f"[{what}] out of memory", file=sys.stderr)
            result: Any = OOM
        except Exception as exc:  # one failing figure must not lose the others
            traceback.print_exc(file=sys.stderr)
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            result = None
        if on_error is not None:
            try:
                on_error()
            except Exception:
                traceback.print_exc(file=sys.stderr)
        free_memory(self.device)
        return result


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Device-to-device copy in TB/s, counting the bytes read and written."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    a.fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    sync(device)
    seconds = time.perf_counter() - start
    del a, b
    return 2 * nbytes * iters / seconds / 1e12


def prompt_length(context: int, new_tokens: int, max_len: int) -> int:
    """The prompt for ``context``: shortened so that prompt + new tokens fit the model's context."""
    return max(1, min(context, max_len - new_tokens))


# --------------------------------------------------------------------------- HF peer
def hf_prefill(hf: Any, ids: torch.Tensor, device: torch.device) -> tuple[float, int | None, Any, torch.Tensor]:
    """(seconds to the first token, peak bytes above what was allocated before, cache, next ids)."""
    base = reset_peak(device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        nxt.tolist()
        sync(device)
        seconds = time.perf_counter() - start
    peak = peak_bytes(device)
    return seconds, None if base is None else peak - base, hf_cache(out), nxt


def hf_decode(hf: Any, cache: Any, nxt: torch.Tensor, n: int, device: torch.device) -> float:
    """Seconds per step over ``n - 1`` steps after the first token (each step's tokens read on the host)."""
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(n - 1):
            out = hf(input_ids=nxt, use_cache=True, logits_to_keep=1, **{hf.cache_arg: cache})
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            nxt.tolist()
        sync(device)
        return (time.perf_counter() - start) / (n - 1)


def run_hf(
    hf: Any,
    plan: Plan,
    prompts: dict[int, list[int]],
    batch_prompts: list[list[int]],
    device: torch.device,
    rec: Recorder,
) -> dict[str, Any]:
    res: dict[str, Any] = {"prefill": {}, "peak": {}, "decode": {}, "decode_tokens": {}, "batch": None}
    # warm-up: kernels, cuBLAS handles, allocator
    warm = torch.tensor([prompts[min(prompts)][:256]], device=device)
    rec("hf warm-up", lambda: hf_decode(hf, *hf_prefill(hf, warm, device)[2:], 3, device))
    for ctx in sorted(prompts):
        ids = torch.tensor([prompts[ctx]], device=device)
        state: dict[str, Any] = {}

        def prefill(ids=ids, state=state) -> tuple[float, int | None]:
            seconds, peak, state["cache"], state["next"] = hf_prefill(hf, ids, device)
            return seconds, peak

        got = rec(f"hf prefill {ctx}", prefill)
        if isinstance(got, tuple):
            res["prefill"][ctx], res["peak"][ctx] = got[0], gib(got[1])
        else:
            res["prefill"][ctx] = res["peak"][ctx] = got
        if ctx in plan.decode_contexts:
            n = plan.hf_new_tokens if ctx <= 32768 else min(plan.hf_new_tokens, 16)
            res["decode_tokens"][ctx] = n
            if "cache" in state:
                step = rec(
                    f"hf decode {ctx}", lambda n=n, state=state: hf_decode(hf, state["cache"], state["next"], n, device)
                )
            else:
                step = got  # the prefill failed: same outcome
            res["decode"][ctx] = step * 1000 if isinstance(step, float) else step
        state.clear()
        del ids
        free_memory(device)

    def batch() -> dict[str, float]:
        ids = torch.tensor(batch_prompts, device=device)
        prefill_s, _, cache, nxt = hf_prefill(hf, ids, device)
        n = plan.batch_new_tokens
        step = hf_decode(hf, cache, nxt, n, device)
        return {"tok_s": len(batch_prompts) / step, "prefill_s": prefill_s}

    if plan.batch > 0:
        res["batch"] = rec("hf batch", batch)
    return res


# --------------------------------------------------------------------------- ours
def engine_request(
    engine: LLMEngine, ids: list[int], n: int, device: torch.device
) -> tuple[float, float | None, int | None]:
    """One request alone: (seconds to first token, ms per later token or None, peak bytes at the first token)."""
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    reset_peak(device)
    times: list[float] = []
    peak = None
    start = time.perf_counter()
    rid = engine.add_request(ids, params)
    limit = len(ids) + 4 * n + 64  # steps; a stall would otherwise loop forever
    try:
        finished = False
        for _ in range(limit):
            outputs = engine.step()
            for out in outputs:
                if out.request_id != rid:
                    continue
                if out.token_ids:
                    sync(device)
                    now = time.perf_counter()
                    if not times:
                        peak = peak_bytes(device)
                    times.extend([now] * len(out.token_ids))
                finished = finished or out.finished
            if finished:
                break
        else:
            raise RuntimeError(f"request of {len(ids)} tokens made no progress in {limit} engine steps")
    finally:
        if rid in engine.requests:
            engine.abort_request(rid)
    if not times:
        raise RuntimeError("the request finished without a token")
    ms = (times[-1] - times[0]) / (len(times) - 1) * 1000 if len(times) > 1 else None
    return times[0] - start, ms, peak


def engine_batch(engine: LLMEngine, prompts: list[list[int]], n: int, device: torch.device) -> dict[str, float]:
    """All prompts at once; decode tokens/s after every request has its first token."""
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    waiting_first, running = set(rids), set(rids)
    all_first = None
    decode_tokens = 0
    limit = sum(len(p) for p in prompts) + 4 * n + 64
    try:
        for _ in range(limit):
            outputs = engine.step()
            for out in outputs:
                if out.request_id not in running:
                    continue
                if all_first is not None:
                    decode_tokens += len(out.token_ids)
                elif out.token_ids:
                    waiting_first.discard(out.request_id)
                if out.finished:
                    running.discard(out.request_id)
            if all_first is None and not waiting_first:
                sync(device)
                all_first = time.perf_counter()
            if not running:
                break
        else:
            raise RuntimeError(f"batch of {len(prompts)} made no progress in {limit} engine steps")
    finally:
        for rid in rids:
            if rid in engine.requests:
                engine.abort_request(rid)
    sync(device)
    end = time.perf_counter()
    if all_first is None or decode_tokens == 0:
        raise RuntimeError("no decode phase after the batch's first tokens")
    return {"tok_s": decode_tokens / (end - all_first), "prefill_s": all_first - start}


def engine_mixed(
    engine: LLMEngine, prompts: list[list[int]], long_prompt: list[int], device: torch.device
) -> dict[str, float]:
    """The batch decoding, then a long prompt prefilled in chunks beside it: the decoders'
    inter-token latency (one token each per step) decode-only and during the prefill."""
    params = SamplingParams(max_new_tokens=1 << 20, ignore_eos=True)
    rids = [engine.add_request(p, params) for p in prompts]
    limit = sum(len(p) for p in prompts) + len(long_prompt) + 256

    def timed_step() -> tuple[float, list]:
        start = time.perf_counter()
        outputs = engine.step()
        sync(device)
        return time.perf_counter() - start, outputs

    try:
        for _ in range(limit):  # every decoder past its prompt
            if all(engine.requests[r].seq.num_uncomputed <= 1 for r in rids if r in engine.requests):
                break
            timed_step()
        alone = [timed_step()[0] for _ in range(8)]
        start = time.perf_counter()
        long_id = engine.add_request(long_prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        during, first = [], None
        for _ in range(limit):
            took, outputs = timed_step()
            during.append(took)
            if any(o.request_id == long_id and o.token_ids for o in outputs):
                first = time.perf_counter() - start
                break
        if first is None:
            raise RuntimeError(f"the {len(long_prompt)}-token prompt got no first token in {limit} steps")
    finally:
        abort_all(engine)
    return {
        "itl_alone_ms": 1000 * sorted(alone)[len(alone) // 2],
        "itl_during_ms": 1000 * sorted(during)[len(during) // 2],
        "itl_during_max_ms": 1000 * max(during),
        "prefill_steps": len(during),
        "long_ttft_s": first,
    }


def abort_all(engine: LLMEngine) -> None:
    for rid in list(engine.requests):
        engine.abort_request(rid)


def run_ours(
    model: MiniCPMForCausalLM,
    plan: Plan,
    prompts: dict[int, list[int]],
    batch_prompts: list[list[int]],
    device: torch.device,
    args: argparse.Namespace,
    rec: Recorder,
    gen: torch.Generator,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "prefill": {},
        "peak": {},
        "decode": {},
        "decode_tokens": {},
        "batch": None,
        "mixed": None,
        "engine": {},
    }
    c = model.config
    block = args.block_size
    config = EngineConfig.for_device(
        device.type,
        block_size=block,
        max_num_seqs=args.max_num_seqs or max(plan.batch + (1 if plan.mixed_context else 0), 1),
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager or None,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    # warm-up: longer than one prefill chunk, so the chunked path (cached past) and graph replay both run
    warm_prompt = random_prompt(
        min(config.max_num_batched_tokens + 2 * block + 7, c.context_length - 8), c.vocab_size, gen
    )
    if args.gpu_memory_utilization is None:
        # the pool: the longest request or the batch case, whichever needs more (they never run together)
        longest = max(len(p) + (plan.new_tokens if ctx in plan.decode_contexts else 1) for ctx, p in prompts.items())
        batch_tokens = sum(-(-(len(p) + plan.batch_new_tokens) // block) * block for p in batch_prompts)
        mixed_tokens = sum(-(-(len(p) + 1024) // block) * block for p in batch_prompts) + plan.mixed_context + block
        need_tokens = max(longest, batch_tokens, len(warm_prompt) + 8, mixed_tokens if plan.mixed_context else 0)
        blocks = -(-need_tokens // block) + 16
        config = dataclasses.replace(
            config, kv_cache_memory=blocks * block * c.kv_bytes_per_token(model.dtype.itemsize)
        )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def build() -> LLMEngine:
        start = time.perf_counter()
        engine = LLMEngine(model, None, config)
        sync(device)
        res["engine"] = {
            "build_s": time.perf_counter() - start,
            "kv_pool_gib": engine.runner.cache.nbytes / GIB,
            "kv_capacity_tokens": engine.kv_capacity,
            "max_model_len": engine.max_model_len,
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "block_size": config.block_size,
            "cuda_graphs": len(engine.runner.graphs),
            "attention": engine.runner.cache.backend.describe(),
        }
        return engine

    engine = rec("engine build", build)
    if not isinstance(engine, LLMEngine):
        for ctx in prompts:
            if ctx in plan.prefill_contexts:
                res["prefill"][ctx] = res["peak"][ctx] = engine
            if ctx in plan.decode_contexts:
                res["decode"][ctx] = engine
        res["batch"] = engine
        return res
    resident = weights + engine.runner.cache.nbytes
    rec("engine warm-up", lambda: engine_request(engine, warm_prompt, 4, device), lambda: abort_all(engine))
    for ctx in sorted(prompts):
        n = plan.new_tokens if ctx in plan.decode_contexts else 1
        got = rec(
            f"ours {ctx}",
            lambda ctx=ctx, n=n: engine_request(engine, prompts[ctx], n, device),
            lambda: abort_all(engine),
        )
        if isinstance(got, tuple):
            ttft, ms, peak = got
            res["prefill"][ctx] = ttft
            res["peak"][ctx] = None if peak is None else gib(peak - resident)
            res["decode"][ctx] = ms
        else:
            res["prefill"][ctx] = res["peak"][ctx] = res["decode"][ctx] = got
        res["decode_tokens"][ctx] = n
    if plan.batch > 0:
        res["batch"] = rec(
            "ours batch",
            lambda: engine_batch(engine, batch_prompts, plan.batch_new_tokens, device),
            lambda: abort_all(engine),
        )
    if plan.batch > 0 and plan.mixed_context > 0:
        long_prompt = random_prompt(min(plan.mixed_context, c.context_length - 8), c.vocab_size, gen)
        res["mixed"] = rec(
            "ours mixed",
            lambda: engine_mixed(engine, batch_prompts, long_prompt, device),
            lambda: abort_all(engine),
        )
    res["engine"]["steps"] = engine.num_steps
    return res


# --------------------------------------------------------------------------- report
def num(x: Any) -> float | None:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def ratio(a: Any, b: Any) -> float | None:
    a, b = num(a), num(b)
    return a / b if a is not None and b is not None and b > 0 else None


def rounded(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, digits) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def targets(
    prefill: list[dict], decode: list[dict], batch: dict, bandwidth: float | None, device_name: str, judged: bool
) -> tuple[list[dict], float]:
    """The targets, set on an H200; the decode ones scale with the copy bandwidth on other cards.

    ``judged`` False (a tiny or CPU run): the values are listed, pass/fail is null.
    """
    scale = 1.0 if "H200" in device_name or not bandwidth or not judged else bandwidth / H200_COPY_TB_S

    def find(rows: list[dict], ctx: int, key: str) -> Any:
        return next((r[key] for r in rows if r["context"] == ctx), None)

    batch_value = batch.get("ours_tok_s") if batch.get("batch") == 32 and batch.get("context") == 1024 else None
    rows = [
        ("decode ms/token, batch 1, 1k context", find(decode, 1024, "ours_ms"), "<=", 2.5, 2.5 / scale),
        ("decode ms/token, batch 1, 128k context", find(decode, 131072, "ours_ms"), "<=", 16.0, 16.0 / scale),
        ("prefill seconds, 128k", find(prefill, 131072, "ours_s"), "<=", 8.0, 8.0),
        ("prefill peak GiB above weights + KV, 128k", find(prefill, 131072, "ours_peak_gib"), "<=", 3.0, 3.0),
        ("decode tok/s, batch 32, 1k context", batch_value, ">=", 6000.0, 6000.0 * scale),
    ]
    out = []
    for name, value, op, h200, target in rows:
        v = num(value)
        ok = None if v is None else (v <= target if op == "<=" else v >= target)
        if value == OOM:
            ok = False
        if not judged:
            ok = None
        out.append({"name": name, "value": value, "op": op, "target_h200": h200, "target": target, "pass": ok})
    return out, scale


def print_tables(summary: dict) -> None:
    print(
        f"device {summary['device']} | dtype {summary['dtype']} | torch {summary['torch']} | "
        f"transformers {summary['transformers']} | tiny {summary['tiny']}"
    )
    e = summary["engine"]
    print(
        f"weights {fmt(summary['weights_gib'], '.2f')} GiB | KV pool {fmt(e.get('kv_pool_gib'), '.2f')} GiB "
        f"({e.get('kv_capacity_tokens')} tokens, {summary['kv_bytes_per_token']} B/token) | engine build "
        f"{fmt(e.get('build_s'), '.1f')} s, {e.get('cuda_graphs')} CUDA graphs, "
        f"attention {e.get('attention')}"
    )
    print(
        f"device-to-device copy {fmt(summary['copy_bandwidth_tb_s'], '.2f')} TB/s (read + written; the H200 anchors: "
        f"{H200_COPY_TB_S}) -> decode targets x{fmt(summary['bandwidth_scale'], '.2f')} of the H200's speed"
    )
    print(f"note: {HF_NOTE}")
    print()
    print(
        "prefill (time to first token; peak: ours above weights + KV pool, its CUDA-graph buffers included; "
        "HF above weights, its KV cache included)"
    )
    print(f"{'context':>8}{'tokens':>8}{'ours s':>10}{'HF s':>10}{'speedup':>9}{'ours GiB':>10}{'HF GiB':>10}")
    for r in summary["prefill"]:
        print(
            f"{r['context']:>8}{r['tokens']:>8}{fmt(r['ours_s']):>10}{fmt(r['hf_s']):>10}"
            f"{fmt(r['speedup'], '.2f'):>9}{fmt(r['ours_peak_gib'], '.2f'):>10}{fmt(r['hf_peak_gib'], '.2f'):>10}"
        )
    print()
    print("decode, batch 1 (ms/token = (t_last - t_first) / (N - 1))")
    print(f"{'context':>8}{'tokens':>8}{'ours ms':>10}{'N':>5}{'HF ms':>10}{'N':>5}{'speedup':>9}")
    for r in summary["decode"]:
        print(
            f"{r['context']:>8}{r['tokens']:>8}{fmt(r['ours_ms'], '.2f'):>10}{r['ours_new_tokens']:>5}"
            f"{fmt(r['hf_ms'], '.2f'):>10}{fmt(r['hf_new_tokens'], 'd'):>5}{fmt(r['speedup'], '.2f'):>9}"
        )
    b = summary["batch"]
    if b.get("batch"):
        print()
        print(
            f"decode, batch {b['batch']} x {b['context']} tokens, {b['new_tokens']} new each: ours "
            f"{fmt(b['ours_tok_s'], '.0f')} tok/s, HF {fmt(b['hf_tok_s'], '.0f')} tok/s, speedup "
            f"{fmt(b['speedup'], '.2f')} (prefill of the batch: ours {fmt(b['ours_prefill_s'])} s, "
            f"HF {fmt(b['hf_prefill_s'])} s)"
        )
    m = summary.get("mixed") or {}
    if m.get("itl_alone_ms") is not None:
        print()
        print(
            f"mixed load: {m['batch']} decoding at {m['context']} tokens while a {m['long_prompt']}-token prompt "
            f"prefills beside them ({m['prefill_steps']} steps): decoders' inter-token latency "
            f"{fmt(m['itl_during_ms'], '.1f')} ms (max {fmt(m['itl_during_max_ms'], '.1f')}) against "
            f"{fmt(m['itl_alone_ms'], '.1f')} ms decode-only; the long prompt's first token after "
            f"{fmt(m['long_ttft_s'], '.2f')} s"
            + (" (a tiny or CPU run: the GPU figures are still to be measured)" if m.get("to_measure_on_gpu") else "")
        )
    print()
    judged = "" if summary["targets_judged"] else "; not judged: a tiny or CPU run"
    print(
        f"targets (performance-anchors.md, set on an H200; decode ones x{fmt(summary['bandwidth_scale'], '.2f')}"
        f"{judged})"
    )
    print(f"{'target':<44}{'value':>10}{'goal':>14}{'H200 goal':>11}{'pass':>6}")
    for t in summary["targets"]:
        value = fmt(t["value"], ".2f")
        goal = f"{t['op']} {t['target']:.2f}"
        verdict = "-" if t["pass"] is None else ("yes" if t["pass"] else "NO")
        print(f"{t['name']:<44}{value:>10}{goal:>14}{t['target_h200']:>11.1f}{verdict:>6}")
    for err in summary["errors"]:
        print(f"error: {err}")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when available), cuda:N or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny MiniCPM shape and short contexts: a smoke run (CPU ok)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--skip-hf", action="store_true", help="measure only ours")
    p.add_argument("--contexts", type=int, nargs="+", help="set both the prefill and the decode contexts")
    p.add_argument("--prefill-contexts", type=int, nargs="+")
    p.add_argument("--decode-contexts", type=int, nargs="+")
    p.add_argument("--new-tokens", type=int, help="ours, per batch-1 decode (default 64; tiny 8)")
    p.add_argument("--hf-new-tokens", type=int, help="HF, per batch-1 decode, at most 16 above 32k (default 32)")
    p.add_argument("--batch", type=int, help="batch size of the throughput case, 0 skips it (default 32)")
    p.add_argument("--batch-context", type=int, help="prompt tokens per request of the batch case (default 1024)")
    p.add_argument("--batch-new-tokens", type=int, help="new tokens per request of the batch case (default 128)")
    p.add_argument(
        "--mixed-context", type=int, help="long prompt prefilled beside the batch's decoders, 0 skips (default 32768)"
    )
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (default: --batch)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine prefill chunk (its default)")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="size the KV pool the engine's way (default: exactly what the runs need, via kv_cache_memory)",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in the engine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-only", action="store_true", help="print only the JSON line")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = dataclasses.replace(TINY_PLAN if args.tiny else FULL_PLAN)
    if args.contexts:
        plan.prefill_contexts = plan.decode_contexts = list(args.contexts)
    if args.prefill_contexts is not None:
        plan.prefill_contexts = list(args.prefill_contexts)
    if args.decode_contexts is not None:
        plan.decode_contexts = list(args.decode_contexts)
    for field in ("new_tokens", "hf_new_tokens", "batch", "batch_context", "batch_new_tokens", "mixed_context"):
        value = getattr(args, field)
        if value is not None:
            setattr(plan, field, value)
    if plan.new_tokens < 2 or plan.hf_new_tokens < 2 or plan.batch_new_tokens < 2:
        raise SystemExit("gpu_engine.py: --new-tokens, --hf-new-tokens and --batch-new-tokens must be >= 2")
    if any(c < 1 for c in plan.prefill_contexts + plan.decode_contexts) or plan.batch < 0 or plan.batch_context < 1:
        raise SystemExit("gpu_engine.py: contexts must be >= 1 and --batch >= 0")
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_engine.py: --device cuda was asked for but torch sees no CUDA device")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit(
            f"gpu_engine.py: device {str(device)!r} is not a GPU. This benchmark needs a CUDA card (H100/H200) "
            "for the MiniCPM-2B-128k shape; run with --tiny for a small smoke run on the CPU."
        )
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if device.type == "cpu" and args.tiny:
        torch.set_num_threads(1)  # a tiny model: threads cost more than they bring, and the timings steady
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    plan = make_plan(args)
    config = tiny_config() if args.tiny else full_config()
    max_len = config.context_length
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    rec = Recorder(device)

    gen = torch.Generator().manual_seed(args.seed)
    contexts = sorted(set(plan.prefill_contexts) | set(plan.decode_contexts))
    prompts = {
        ctx: random_prompt(
            prompt_length(ctx, plan.new_tokens if ctx in plan.decode_contexts else 1, max_len), config.vocab_size, gen
        )
        for ctx in contexts
    }
    batch_prompts = [
        random_prompt(prompt_length(plan.batch_context, plan.batch_new_tokens, max_len), config.vocab_size, gen)
        for _ in range(plan.batch)
    ]

    bandwidth = rec(
        "copy bandwidth",
        lambda: copy_bandwidth(
            device, GIB if device.type == "cuda" else 64 * 2**20, 20 if device.type == "cuda" else 3
        ),
    )
    model = build_model(config, device, dtype, args.seed)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    transformers_version = None
    hf_res: dict[str, Any] = {"prefill": {}, "peak": {}, "decode": {}, "decode_tokens": {}, "batch": None}
    if not args.skip_hf:
        try:
            import transformers

            transformers_version = transformers.__version__
        except ImportError:
            rec.errors.append("hf: transformers is not installed (use --skip-hf)")
        hf = rec("hf build", lambda: build_hf(model, device)) if transformers_version else None
        if hf is not None and not isinstance(hf, str):
            hf_res = run_hf(hf, plan, prompts, batch_prompts, device, rec)
        del hf
        free_memory(device)

    ours = run_ours(model, plan, prompts, batch_prompts, device, args, rec, gen)
    free_memory(device)

    prefill_rows = [
        {
            "context": ctx,
            "tokens": len(prompts[ctx]),
            "ours_s": ours["prefill"].get(ctx),
            "hf_s": hf_res["prefill"].get(ctx),
            "speedup": ratio(hf_res["prefill"].get(ctx), ours["prefill"].get(ctx)),
            "ours_peak_gib": ours["peak"].get(ctx),
            "hf_peak_gib": hf_res["peak"].get(ctx),
        }
        for ctx in contexts
        if ctx in plan.prefill_contexts
    ]
    decode_rows = [
        {
            "context": ctx,
            "tokens": len(prompts[ctx]),
            "ours_ms": ours["decode"].get(ctx),
            "ours_new_tokens": ours["decode_tokens"].get(ctx, plan.new_tokens),
            "hf_ms": hf_res["decode"].get(ctx),
            "hf_new_tokens": hf_res["decode_tokens"].get(ctx),
            "speedup": ratio(hf_res["decode"].get(ctx), ours["decode"].get(ctx)),
        }
        for ctx in contexts
        if ctx in plan.decode_contexts
    ]
    ob, hb = ours["batch"], hf_res["batch"]
    batch_row = {
        "batch": plan.batch,
        "context": len(batch_prompts[0]) if batch_prompts else None,
        "new_tokens": plan.batch_new_tokens,
        "ours_tok_s": ob["tok_s"] if isinstance(ob, dict) else ob,
        "hf_tok_s": hb["tok_s"] if isinstance(hb, dict) else hb,
        "ours_prefill_s": ob["prefill_s"] if isinstance(ob, dict) else None,
        "hf_prefill_s": hb["prefill_s"] if isinstance(hb, dict) else None,
    }
    batch_row["speedup"] = ratio(batch_row["ours_tok_s"], batch_row["hf_tok_s"])
    om = ours.get("mixed")
    mixed_row = {"batch": plan.batch, "context": batch_row["context"], "long_prompt": plan.mixed_context}
    mixed_row |= om if isinstance(om, dict) else {"error": om}
    mixed_row["to_measure_on_gpu"] = device.type != "cuda" or args.tiny
    judged = device.type == "cuda" and not args.tiny
    target_rows, scale = targets(prefill_rows, decode_rows, batch_row, num(bandwidth), device_name, judged)
    summary = {
        "benchmark": "gpu_engine",
        "device": device_name,
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "tiny": args.tiny,
        "model": {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "max_position_embeddings": config.max_position_embeddings,
            "max_length": config.max_length,
        },
        "weights_gib": weights / GIB,
        "kv_bytes_per_token": config.kv_bytes_per_token(dtype.itemsize),
        "copy_bandwidth_tb_s": bandwidth,
        "bandwidth_scale": scale,
        "engine": ours["engine"],
        "prefill": prefill_rows,
        "decode": decode_rows,
        "batch": batch_row,
        "mixed": mixed_row,
        "targets": target_rows,
        "targets_judged": judged,
        "hf_note": None if args.skip_hf else HF_NOTE,
        "errors": rec.errors,
        "total_s": time.perf_counter() - started,
    }
    summary = rounded(summary)
    if not args.json_only:
        print_tables(summary)
        print(f"total {summary['total_s']:.1f} s")
    print(json.dumps(summary))
    return 1 if rec.errors else 0


if __name__ == "__main__":
    sys.exit(main())
