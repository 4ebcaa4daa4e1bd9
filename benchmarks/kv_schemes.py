"""KV cache quantization schemes, simulated: which way of cutting keys and values into groups loses
the least perplexity for its bytes (issue 22, item 2).

Every scheme is simulated by fake-quantizing each layer's keys and values inside the perplexity
forward (an attention cache object like :class:`minicpm.eval.perplexity.RoundTripCache`), on the
embedded default model in float32 (``--quantize none``: the f32 GGUF's weights), over the same
tokens and windows as ``minicpm eval perplexity`` (llama.cpp's way: non-overlapping windows, the
second half scored). The keys are the rotated ones (what the cache stores).

    float32        no quantization (the reference)
    int8           our int8 layout: symmetric groups of 32 along head_dim, float16 scale (q8_0)
    int4           our int4 layout: asymmetric groups of 32 along head_dim, float16 scale and min
                   (q4_1), the min / max pair; unrotated (what shipped before the rotation and the
                   fitted writer); int4-fit-hkv: the engine's fitted writer (kv_format.int4_fit),
                   rotated, pairs per 32 for keys and values; int4-fitv64-hkv: the same with the
                   values' pairs per 64 (what the engine's int4 cache ships)
    q4_0           symmetric 4-bit groups of 32 along head_dim, float16 scale, llama.cpp's q4_0 rule
    kivi4-g32      keys per channel in groups of 32 tokens, values per token in groups of 32 along
                   head_dim (asymmetric, float16 scale and min), 4-bit; the newest partial group of
                   tokens in full precision (KIVI)
    kivi4-g128     likewise, groups of 128 tokens (a cache block)
    kivi2-g32/128  likewise, 2-bit
    token2         2-bit asymmetric groups of 32 along head_dim, keys and values, no window
    token2-w128    token2 with the same full-precision window as kivi2-g128 (the window's share)
    token4-w128    int4 with that window
    int8-mu        int8 (q8_0's rule) of the keys less int4-mu's mean
    int4-hk        int4 of queries and keys times a 64-point Walsh-Hadamard matrix (exact in
                   float: orthonormal), values as they are; int4-hkv: values rotated too, the
                   output rotated back (what the engine's int4 cache ships, ``kv_rotation``);
                   q4_0-hkv: q4_0's rule so (llama.cpp's default for a quantized cache:
                   attn_rot_k / attn_rot_v)
    int4-g64-hkv   int4-hkv with one scale and min per 64 values (a whole head row) for keys and
                   values (36 bytes a row instead of 40); int4-v64-hkv: for values only (keys as
                   int4-hkv): the KV bytes that would bring a 128k context under 16 GiB, and their cost
    int4-mse-hkv   int4-hkv, each group's (scale, min) the least squared error of 25 clipped ranges
                   (5 cuts at either end); int4-mse9-hkv: 9 (3 cuts); int4-ls-hkv: the least-squares
                   (scale, min) of the min/max codes; int4-ls2-hkv: refitted twice (what the engine's
                   writer does, kv_format.int4_fit, less its never-worse-than-plain check). The format
                   is int4's: only the writer's choice of (scale, min) differs
    int4-mu        int4 of the keys less a static per-channel mean (per layer and kv head, of the
                   rotated keys over ``--calibration`` tokens of another text: the needle eval's
                   essays where installed, else the text's tail beyond the scored windows; or
                   ``--calibration-text``; ``--horizon N``: that mean spread over N positions).
                   Exact in float: a query's scores all move by the same q . mean, which softmax
                   ignores; needs no kernel change, only the cache's writer

The windowed schemes are causal exactly as a decode sees them: a group of tokens is quantized with
its own statistics once it is full (a decode at the group's last token already reads it quantized),
so query ``i`` reads tokens ``< G * floor((i + 1) / G)`` quantized and the rest of its own partial
group, itself included, in full precision.

Bytes per token are counted at MiniCPM-2B-128k's shape (40 layers, 36 kv heads, head_dim 64) with
float16 scales and mins, windows excluded; ``window_bytes`` is what a sequence's full-precision
window adds at most (G tokens in float16). With ``--against`` (the JSON line of
``benchmarks/kv_quality.py``), the 2-bit schemes are also judged against llama.cpp's q4_0 KV cache
on the same tokens (the issue's bar for shipping 2-bit). Each scheme's change carries the
standard error of the paired per-token difference of its log-likelihoods against float32
(``delta_se_pct``): how far apart two schemes must be to differ beyond the text's noise. Prints a
table, then one JSON object.

    python benchmarks/kv_schemes.py [--quick] [--tokens N] [--schemes ...] [--against kv_quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

HERE = Path(__file__).resolve().parent
GROUP = 32  # values along head_dim per scale (the per-token schemes)
MINICPM_SHAPE = {"layers": 40, "kv_heads": 36, "head_dim": 64}  # MiniCPM-2B-128k


@dataclass(frozen=True)
class Scheme:
    """``keys``: "token" (groups of 32 along head_dim) or "channel" (one group per channel and
    ``window`` tokens); values are always per token. ``bits`` 0: float; ``symmetric``: one scale
    per group (q8_0 / q4_0), else a scale and a min. ``window``: tokens per group of the
    full-precision window (0: none)."""

    name: str
    bits: int = 0
    keys: str = "token"
    symmetric: bool = False
    window: int = 0
    offset: bool = False  # keys less a static per-channel mean (calibrated) before quantizing
    rotate: str = ""  # "k": queries and keys times a Hadamard matrix; "kv": values too (output rotated back)
    group: int = GROUP  # values along head_dim per scale (the per-token schemes)
    search: str = ""  # asymmetric: "grid25" / "grid9": the (scale, min) of the least squared error over
    # clipped ranges; "ls": the codes' least-squares (scale, min), the codes then made again
    value_group: int = 0  # the values' group when it differs from the keys' (0: ``group``)

    def row_bytes(self, head_dim: int, channel: bool) -> float:
        """Bytes a (token, kv head) row of keys (``channel``) or values takes."""
        if not self.bits:
            return 2.0 * head_dim
        codes = self.bits * head_dim / 8
        if channel and self.keys == "channel":
            return codes + 2 * 2 * head_dim / self.window  # scale and min per channel per group of tokens
        group = self.group if channel or not self.value_group else self.value_group
        return codes + 2 * (1 if self.symmetric else 2) * head_dim / group

    def bytes_per_token(self, layers: int, kv_heads: int, head_dim: int) -> float:
        return layers * kv_heads * (self.row_bytes(head_dim, True) + self.row_bytes(head_dim, False))

    def window_bytes(self, layers: int, kv_heads: int, head_dim: int) -> int:
        return self.window * layers * kv_heads * 2 * head_dim * 2


SCHEMES = {
    s.name: s
    for s in (
        Scheme("float32"),
        Scheme("int8", 8, symmetric=True),
        Scheme("int4", 4),
        Scheme("q4_0", 4, symmetric=True),
        Scheme("kivi4-g32", 4, "channel", window=32),
        Scheme("kivi4-g128", 4, "channel", window=128),
        Scheme("kivi2-g32", 2, "channel", window=32),
        Scheme("kivi2-g128", 2, "channel", window=128),
        Scheme("token2", 2),
        Scheme("token2-w128", 2, window=128),
        Scheme("token4-w128", 4, window=128),
        Scheme("int4-mu", 4, offset=True),
        Scheme("int8-mu", 8, symmetric=True, offset=True),
        Scheme("int4-hk", 4, rotate="k"),
        Scheme("int4-hkv", 4, rotate="kv"),
        Scheme("q4_0-hkv", 4, symmetric=True, rotate="kv"),
        Scheme("int4-g64-hkv", 4, rotate="kv", group=64),
        Scheme("int4-v64-hkv", 4, rotate="kv", value_group=64),
        Scheme("int4-mse-hkv", 4, rotate="kv", search="grid25"),
        Scheme("int4-mse9-hkv", 4, rotate="kv", search="grid9"),
        Scheme("int4-ls-hkv", 4, rotate="kv", search="ls"),
        Scheme("int4-ls2-hkv", 4, rotate="kv", search="ls2"),
        Scheme("int4-fit-hkv", 4, rotate="kv", search="engine"),
        Scheme("int4-fitv64-hkv", 4, rotate="kv", search="engine", value_group=64),
    )
}


# ----------------------------------------------------------------------------------- quantizers
def _asymmetric(x: Tensor, bits: int, dim: int) -> Tensor:
    """x with each slice along ``dim`` quantized to ``bits`` with a float16 scale and min (the
    rule of minicpm's int4: scale = (max - min) / levels rounded to float16 first)."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / levels).half().float()
    lo = lo.half().float()
    div = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round((x - lo) / div), 0, levels) * scale + lo


CLIPS = {"grid25": (0.0, 0.03, 0.06, 0.09, 0.12), "grid9": (0.0, 0.05, 0.1)}  # cut from either end


def _least_squares(x: Tensor, bits: int, rounds: int = 1) -> Tensor:
    """min/max codes, then ``rounds`` times the (scale, min) that fit them best (a linear regression
    of x on the codes), rounded to float16, and the codes made again with them."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / levels
    codes = torch.clamp(torch.round((x - lo) / torch.where(scale == 0, torch.ones_like(scale), scale)), 0, levels)
    n = x.shape[-1]
    for _ in range(rounds):
        sc, sx = codes.sum(-1, keepdim=True), x.sum(-1, keepdim=True)
        scc, scx = codes.square().sum(-1, keepdim=True), (codes * x).sum(-1, keepdim=True)
        det = n * scc - sc * sc
        ok = det > 0
        fit_s = torch.where(ok, (n * scx - sc * sx) / torch.where(ok, det, torch.ones_like(det)), scale)
        fit_m = torch.where(ok, (sx - fit_s * sc) / n, lo)
        scale, lo = fit_s.half().float(), fit_m.half().float()
        div = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.clamp(torch.round((x - lo) / div), 0, levels)
    return codes * scale + lo


def _asymmetric_search(x: Tensor, bits: int, clips: tuple[float, ...]) -> Tensor:
    """``x`` (..., group) quantized as :func:`_asymmetric`, each group with the (scale, min), among
    its range clipped by every pair of :data:`CLIPS` at the bottom and the top, whose round trip
    has the least squared error (the format is the same: only the writer's choice changes)."""
    levels = (1 << bits) - 1
    lo0, hi0 = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    best, best_err = None, None
    for a in clips:
        for b in clips:
            lo, hi = lo0 + a * (hi0 - lo0), hi0 - b * (hi0 - lo0)
            scale = ((hi - lo) / levels).half().float()
            lo = lo.half().float()
            div = torch.where(scale == 0, torch.ones_like(scale), scale)
            y = torch.clamp(torch.round((x - lo) / div), 0, levels) * scale + lo
            err = (y - x).square().sum(-1, keepdim=True)
            if best is None:
                best, best_err = y, err
            else:
                take = err < best_err
                best, best_err = torch.where(take, y, best), torch.where(take, err, best_err)
    return best


def _q4_0(g: Tensor) -> Tensor:
    """llama.cpp's quantize_row_q4_0_ref on groups (last dim): d = (the value of largest
    magnitude) / -8, codes min(15, (int)(x / d + 8.5)), read back as (code - 8) * fp16(d)."""
    idx = g.abs().argmax(-1, keepdim=True)
    d = g.gather(-1, idx) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = torch.clamp(torch.trunc(g * inv + 8.5), max=15)
    return (codes - 8) * d.half().float()


def _int8(g: Tensor) -> Tensor:
    """llama.cpp's q8_0 (minicpm's int8): scale = max|x| / 127 in float16, codes rounded."""
    scale = (g.abs().amax(-1, keepdim=True) / 127).half().float()
    div = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(g / div), -127, 127) * scale


def per_token(x: Tensor, scheme: Scheme, group: int = GROUP) -> Tensor:
    """``x`` (..., head_dim) through groups of ``group`` along head_dim."""
    shape = x.shape
    g = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    if scheme.bits == 8:
        out = _int8(g)
    elif scheme.symmetric:
        out = _q4_0(g)
    elif scheme.search == "engine":
        from minicpm.engine.attention.kv_format import INT4_FITS, int4_fit

        scale, lo, codes = int4_fit(g, INT4_FITS)
        out = codes * scale.float() + lo.float()
    elif scheme.search.startswith("ls"):
        out = _least_squares(g, scheme.bits, int(scheme.search[2:] or 1))
    elif scheme.search:
        out = _asymmetric_search(g, scheme.bits, CLIPS[scheme.search])
    else:
        out = _asymmetric(g, scheme.bits, -1)
    return out.reshape(shape).to(x.dtype)


def per_channel(k: Tensor, scheme: Scheme) -> Tensor:
    """``k`` (batch, heads, tokens, head_dim) with each channel quantized in groups of
    ``scheme.window`` tokens; a trailing partial group is left as it is (never read quantized)."""
    g = scheme.window
    full = k.shape[-2] // g * g
    out = k.clone()
    if full:
        body = k[..., :full, :].float().unflatten(-2, (full // g, g))
        out[..., :full, :] = _asymmetric(body, scheme.bits, -2).flatten(-3, -2).to(k.dtype)
    return out


class SchemeCache:
    """Attention over keys and values as ``scheme`` stores them (one window, nothing kept across
    forwards), for :func:`ppl`; see the module docstring for the windowed schemes."""

    length = 0

    def __init__(self, scheme: Scheme, rows: int = 1024, offsets: dict[int, Tensor] | None = None) -> None:
        self.scheme, self.rows, self.offsets = scheme, rows, offsets
        if scheme.offset and offsets is None:
            raise ValueError(f"{scheme.name} needs the keys' per-channel means (calibrate_offsets)")

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s = self.scheme
        if s.offset:
            k = k - self.offsets[layer][None, :, None, :].to(k.dtype)
        if s.rotate:  # the engine's matrix (what llama.cpp multiplies a quantized cache's q, k and v by)
            from minicpm.engine.attention.kv_format import hadamard

            h = hadamard(k.shape[-1]).to(k.dtype)
            q, k = q @ h, k @ h
            if s.rotate == "kv":
                v = v @ h
        kq = per_channel(k, s) if s.keys == "channel" else per_token(k, s, s.group)
        vq = per_token(v, s, s.value_group or s.group)
        if not s.window:
            out = F.scaled_dot_product_attention(q, kq, vq, is_causal=True, enable_gqa=True)
            return out @ h if s.rotate == "kv" else out  # h is its own inverse
        out = torch.empty_like(q)
        t = q.shape[-2]
        for r0 in range(0, t, self.rows):  # query rows in slices: the (rows, 2 * keys) mask stays small
            r1 = min(r0 + self.rows, t)
            i = torch.arange(r0, r1)[:, None]
            j = torch.arange(r1)[None, :]
            bound = (i + 1) // s.window * s.window  # tokens before it: full groups, read quantized
            mask = torch.cat((j < bound, (j >= bound) & (j <= i)), dim=-1)
            keys = torch.cat((kq[..., :r1, :], k[..., :r1, :]), dim=-2)
            values = torch.cat((vq[..., :r1, :], v[..., :r1, :]), dim=-2)
            out[..., r0:r1, :] = F.scaled_dot_product_attention(
                q[..., r0:r1, :], keys, values, attn_mask=mask, enable_gqa=True
            )
        return out @ h if s.rotate == "kv" else out


class MeanKeys:
    """An attention cache that records each layer's mean rotated key per (kv head, channel)."""

    length = 0

    def __init__(self) -> None:
        self.means: dict[int, Tensor] = {}

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.means[layer] = k[0, :, 1:].float().mean(dim=1)  # (kv_heads, head_dim); the sink token left out
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@torch.inference_mode()
def calibrate_offsets(model, ids: list[int], horizon: int | None = None) -> dict[int, Tensor]:
    """Per layer, the mean rotated key (kv_heads, head_dim) over ``ids`` in one forward; with
    ``horizon``, spread as the mean of those keys shifted by every position below it (a shift of
    positions commutes with RoPE's rotation: the mean over a long text made of the calibration)."""
    from minicpm.model import rope_inv_freq

    recorder = MeanKeys()
    model(torch.tensor([ids]), cache=recorder, logits_to_keep=torch.tensor([len(ids) - 1]))
    if horizon is None:
        return recorder.means
    angles = torch.arange(horizon, dtype=torch.float64)[:, None] * rope_inv_freq(model.config, horizon).double()
    cos, sin = angles.cos().mean(0), angles.sin().mean(0)
    out = {}
    for layer, mean in recorder.means.items():
        x1, x2 = mean.double().chunk(2, dim=-1)
        out[layer] = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).float()
    return out


def calibration_ids(tokenizer, ids: list[int], used: int, tokens: int, path: str | None) -> tuple[list[int], str]:
    """``tokens`` ids of a text other than the scored one: ``path``'s, else the needle eval's essays
    where installed, else the scored text's tail beyond its first ``used`` tokens."""
    if path is not None:
        return tokenizer.encode(Path(path).read_text(encoding="utf-8"))[:tokens], Path(path).name
    try:
        from minicpm.eval.needle import haystack_text

        return tokenizer.encode(haystack_text())[:tokens], "the needle eval's essays (Paul Graham)"
    except (FileNotFoundError, ImportError):
        if len(ids) - used < tokens:
            raise SystemExit(f"no calibration text: {len(ids)} tokens, {used} scored, {tokens} wanted") from None
        return ids[-tokens:], f"the text's last {tokens} tokens (not scored)"


@torch.inference_mode()
def ppl(
    model, ids: list[int], context: int, scheme: Scheme, windows: int, offsets: dict[int, Tensor] | None = None
) -> dict:
    """Perplexity as :func:`minicpm.eval.perplexity.perplexity` measures it, through ``scheme``;
    ``"nll"``: the scored tokens' negative log-likelihoods (for paired comparisons)."""
    from minicpm.eval.perplexity import window_plan

    plan = window_plan(len(ids), context, context)[:windows]
    cache = None if not scheme.bits else SchemeCache(scheme, offsets=offsets)
    nll = []
    for start, first in plan:
        window = torch.tensor([ids[start : start + context]])
        keep = torch.arange(first - 1, context - 1)
        logits = model(window, cache=cache, logits_to_keep=keep)[0]
        nll.append(-torch.log_softmax(logits.double(), -1).gather(-1, window[0, first:, None])[:, 0])
    values = torch.cat(nll)
    p = math.exp(values.mean().item())
    return {
        "ppl": p,
        "stderr": p * values.std().item() / math.sqrt(values.numel()),
        "scored": values.numel(),
        "nll": values,
    }


def paired_change(nll: Tensor, base: Tensor) -> tuple[float, float]:
    """(change of perplexity in percent, its standard error) from paired per-token NLLs."""
    d = nll - base
    mean, se = d.mean().item(), d.std().item() / math.sqrt(d.numel())
    return 100 * math.expm1(mean), 100 * math.exp(mean) * se


# ------------------------------------------------------------------------------------- driver
def text_ids(path: str | None) -> list[int]:
    sys.path.insert(0, str(HERE))
    from cpu_formats import botchan

    from minicpm import Tokenizer
    from minicpm.default_model import cache_root, default_model_path

    text = Path(path) if path else botchan(cache_root() / "bench")
    return Tokenizer.from_pretrained(default_model_path()).encode(text.read_text(encoding="utf-8"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument(
        "--tokens",
        type=int,
        default=12288,
        help="tokens of the text in windows, per context (default 12288, as kv_quality.py: 12 windows of 1k, "
        "3 of 4k; 0: all)",
    )
    p.add_argument("--text", default=None, help="text file (default: the first 100 kB of Botchan)")
    p.add_argument("--against", default=None, metavar="JSON", help="kv_quality.py's JSON line: judge 2-bit vs q4_0")
    p.add_argument("--calibration", type=int, default=1024, help="tokens the int4-mu offsets are measured on")
    p.add_argument(
        "--calibration-text", default=None, help="int4-mu: calibrate on this file (benchmarks/calibration_mixed.txt)"
    )
    p.add_argument("--horizon", type=int, default=None, help="int4-mu: the calibration's mean spread to N positions")
    p.add_argument("--quick", action="store_true", help="4 windows of 1k and 1 of 4k (a smoke run)")
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from minicpm import LLM
    from minicpm.engine import EngineConfig

    schemes = [SCHEMES[n] for n in dict.fromkeys(["float32", *args.schemes])]
    ids = text_ids(args.text)
    tokens = 4096 if args.quick else args.tokens or len(ids)
    windows = {c: max(1, min(tokens, len(ids)) // c) for c in args.contexts}
    config = EngineConfig(quantize="none", kv_cache_memory=64 << 20)
    llm = LLM.from_pretrained(None, device="cpu", dtype="float32", engine_config=config)
    model = llm.engine.runner.model
    offsets, calibration = None, None
    if any(s.offset for s in schemes):
        used = max(windows[c] * c for c in args.contexts)
        calib, source = calibration_ids(llm.tokenizer, ids, used, args.calibration, args.calibration_text)
        offsets = calibrate_offsets(model, calib, args.horizon)
        calibration = {"tokens": len(calib), "source": source, "horizon": args.horizon}
    results: dict[str, dict] = {}
    for s in schemes:
        row: dict = {"scheme": asdict(s), "bytes_per_token": s.bytes_per_token(**MINICPM_SHAPE)}
        row["window_bytes"] = s.window_bytes(**MINICPM_SHAPE)
        for c in args.contexts:
            start = time.perf_counter()
            row[f"ppl@{c}"] = ppl(model, ids, c, s, windows[c], offsets) | {"seconds": time.perf_counter() - start}
        print(f"{s.name}: " + ", ".join(f"{c}: {row[f'ppl@{c}']['ppl']:.4f}" for c in args.contexts), file=sys.stderr)
        results[s.name] = row
    base = results["float32"]
    for row in results.values():
        for c in args.contexts:
            cell = row[f"ppl@{c}"]
            cell["delta_pct"], cell["delta_se_pct"] = paired_change(cell["nll"], base[f"ppl@{c}"]["nll"])
    for row in results.values():
        for c in args.contexts:
            del row[f"ppl@{c}"]["nll"]
    report = {
        "benchmark": "kv_schemes",
        "quick": args.quick,
        "text_tokens": len(ids),
        "contexts": args.contexts,
        "windows": {str(c): w for c, w in windows.items()},
        "shape": MINICPM_SHAPE,
        "float16_bytes_per_token": SCHEMES["float32"].bytes_per_token(**MINICPM_SHAPE),
        "calibration": calibration,
        "schemes": results,
    }
    if args.against:
        report["against_llama.cpp_q4_0"] = judge(results, json.loads(Path(args.against).read_text().splitlines()[-1]))
    print_table(report)
    print(json.dumps(report))
    return 0


def judge(results: dict, quality: dict) -> dict:
    """Per 2-bit scheme and context: is its perplexity loss at most llama.cpp's q4_0 KV loss?"""
    out = {}
    peer = quality["llama.cpp"]
    for name, row in results.items():
        if row["scheme"]["bits"] != 2:
            continue
        verdict = {}
        for key in (k for k in row if k.startswith("ppl@")):
            theirs = peer.get("q4_0", {}).get(key, {}).get("delta_pct")
            if theirs is not None:
                ours = row[key]["delta_pct"]
                verdict[key] = {"ours_pct": ours, "q4_0_pct": theirs, "beats": ours <= theirs}
        out[name] = verdict
    return out


def print_table(r: dict) -> None:
    cs = r["contexts"]
    print(
        f"{'scheme':<13} {'bytes/token':>11} {'x fp16':>6} "
        + " ".join(f"{'ppl@' + str(c):>9} {'delta':>15}" for c in cs)
    )
    for name, row in r["schemes"].items():
        cells = " ".join("{ppl:>9.4f} {delta_pct:>+6.2f}% +-{delta_se_pct:.2f}".format(**row[f"ppl@{c}"]) for c in cs)
        ratio = r["float16_bytes_per_token"] / row["bytes_per_token"]
        print(f"{name:<13} {row['bytes_per_token']:>11.0f} {ratio:>6.2f} {cells}")
    for name, verdict in r.get("against_llama.cpp_q4_0", {}).items():
        for key, v in verdict.items():
            word = "beats" if v["beats"] else "loses"
            print(f"{name} {key}: {v['ours_pct']:+.2f}% vs llama.cpp q4_0 {v['q4_0_pct']:+.2f}%: {word}")


if __name__ == "__main__":
    sys.exit(main())
