"""How the paged KV cache stores keys and values: :class:`KVFormat`, and the one reference
quantizer and dequantizer every backend is tested against.

Contract:

* A format is ``float32``, ``bfloat16`` (the activations' own dtype: stored as computed),
  ``int8``, ``int4`` or ``fp8``. The quantized ones cut each (token, kv head) row of ``head_dim``
  values into groups of consecutive values along ``head_dim`` (:meth:`KVFormat.group`: keys in
  :data:`GROUP` (32); int4's values in :data:`VALUE_GROUP` (64) where ``head_dim`` is a multiple
  of it, else 32), each with its own float16 scale stored beside it, indexed by the same slot as
  the codes (so a block's scales move with its block: paging, prefix sharing, preemption and
  ``n`` choices need nothing new):

  - ``int8``: symmetric, ``x = code * scale``, codes in [-127, 127], ``scale = max|x| / 127``
    (llama.cpp's q8_0: 8.5 bits a value).
  - ``int4``: asymmetric, ``x = code * scale + min``, codes in [0, 15] packed two to a byte
    (in each run of 32 values, byte ``j`` holds value ``j`` in its low nibble and value ``j + 16``
    in its high one, as llama.cpp's q4 blocks, whatever the group; keys have llama.cpp's q4_1
    layout, 5 bits a value, values 4.5 where grouped by 64). The writer
    picks each group's float16 ``(scale, min)`` for the least squared error among the plain pair
    (``min``, ``(max - min) / 15``) and :data:`INT4_FITS` least-squares refits, each the
    regression of the values on the previous pair's codes (llama.cpp's k-quants fit their scales
    so; any pair is read the same way). Its sums over a group are taken in one fixed order
    (:func:`tree_sum`), so the C writer (``csrc/kv_quant.c``) gives the same codes bit for bit.
    A CUDA cache writes the plain pair only (:func:`writer_fits`): in torch the fit is some 300
    small operators a tensor (the plain pair: two dozen), too many for a decode step's graph, until a
    fused GPU writer exists.
  - ``fp8`` (CUDA): float8 e4m3 codes, ``x = code * scale``, ``scale = max|x| / 448``.

  Scales are rounded to float16 before the codes are computed, so ``dequantize(quantize(x))`` is
  what every kernel reads.
* A quantized cache is rotated (``EngineConfig.kv_rotation``, on by default; llama.cpp does the
  same for its quantized caches): queries, keys and values are multiplied by the orthonormal
  64-point Walsh-Hadamard matrix :func:`hadamard` (block-diagonal over ``head_dim``, a multiple of
  64) before the keys and values are stored, and each attention output by it again (it is its own
  inverse). Attention is unchanged in real arithmetic (``(q H) . (k H) = q . k``); the quantizer
  sees channels mixed, so an outlier channel no longer sets its group's scale alone.
  :func:`rotate_heads` is the one definition: in float32, rounded once to the input's dtype.
* :func:`resolve_kv_format` maps a user's ``kv_cache_dtype`` ("auto" or a name) to a format for
  an activation dtype and device, or raises a :class:`~minicpm.errors.UserError` naming what is
  wrong (a float cache in another dtype than the activations, fp8 off CUDA, an odd head size).
* Bytes per token (:meth:`KVFormat.bytes_per_token`) count codes and scales exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import UserError
from ..config import KV_CACHE_DTYPES

GROUP = 32  # values along head_dim per scale (int4 values: VALUE_GROUP where head_dim allows)
VALUE_GROUP = 64  # int4 values per (scale, min): a whole head of MiniCPM (keys in 64s lose 3x more)
INT4_FITS = 2  # least-squares refits of an int4 group's (scale, min) after the plain one (csrc/kv_quant.c)
ROTATION = 64  # the Hadamard rotation's size (head_dim must be a multiple of it)
_FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8_MAX = 448.0


@dataclass(frozen=True)
class KVFormat:
    """One way of storing the cache (see the module docstring). ``dtype``: the codes' dtype;
    ``scales``: float16 numbers per group (0: a float format, 1: a scale, 2: a scale and a minimum)."""

    name: str
    dtype: torch.dtype
    scales: int = 0

    @property
    def quantized(self) -> bool:
        return self.scales > 0

    def code_width(self, head_dim: int) -> int:
        """Codes per (token, kv head) row, in elements of ``dtype``."""
        return head_dim // 2 if self.name == "int4" else head_dim

    def group(self, head_dim: int, value: bool = False) -> int:
        """Values along ``head_dim`` per scale of a key row, or of a value row (``value``)."""
        return VALUE_GROUP if value and self.name == "int4" and head_dim % VALUE_GROUP == 0 else GROUP

    def scale_width(self, head_dim: int, value: bool = False) -> int:
        """float16 numbers per (token, kv head) row of keys, or of values (``value``)."""
        return head_dim // self.group(head_dim, value) * self.scales

    def bytes_per_row(self, head_dim: int, value: bool = False) -> int:
        return self.code_width(head_dim) * self.dtype.itemsize + 2 * self.scale_width(head_dim, value)

    def bytes_per_token(self, layers: int, kv_heads: int, head_dim: int) -> int:
        """Bytes one token takes in the cache: keys and values of every layer and kv head."""
        return layers * kv_heads * (self.bytes_per_row(head_dim) + self.bytes_per_row(head_dim, True))

    def quantize(self, x: Tensor, fits: int = INT4_FITS, value: bool = False) -> tuple[Tensor, Tensor | None]:
        """(codes, float16 scales) of keys ``x`` (..., head_dim), or of values (``value``); a
        float format returns (x in its dtype, None). ``fits``: int4's least-squares refits (0: the
        plain pair only)."""
        if not self.quantized:
            return x.to(self.dtype), None
        shape = x.shape
        n = self.group(shape[-1], value)
        g = x.float().reshape(*shape[:-1], shape[-1] // n, n)
        if self.name == "int4":
            scale, lo, codes = int4_fit(g, fits)
            codes = codes.to(torch.uint8).reshape(*shape[:-1], -1, GROUP)  # packed in runs of 32
            packed = (codes[..., :16] | (codes[..., 16:] << 4)).reshape(*shape[:-1], -1)
            scales = torch.cat((scale, lo), dim=-1).reshape(*shape[:-1], -1)
            return packed, scales
        top = 127.0 if self.name == "int8" else FP8_MAX
        scale = (g.abs().amax(-1, keepdim=True) / top).half()
        div = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        if self.name == "int8":
            codes = torch.clamp(torch.round(g / div), -127, 127).to(torch.int8)
        else:
            codes = torch.clamp(g / div, -FP8_MAX, FP8_MAX).to(self.dtype)
        return codes.reshape(shape), scale.reshape(*shape[:-1], -1)

    def dequantize(self, codes: Tensor, scales: Tensor | None, dtype: torch.dtype, value: bool = False) -> Tensor:
        """Keys (..., head_dim), or values (``value``), in ``dtype`` from what :meth:`quantize` stored."""
        if not self.quantized:
            return codes.to(dtype)
        if self.name == "int4":
            pairs = codes.reshape(*codes.shape[:-1], -1, GROUP // 2)
            vals = torch.cat((pairs & 0xF, pairs >> 4), dim=-1).reshape(*codes.shape[:-1], -1).float()
        else:
            vals = codes.float()
        shape = vals.shape
        n = self.group(shape[-1], value)
        g = vals.reshape(*shape[:-1], shape[-1] // n, n)
        s = scales.float().reshape(*shape[:-1], shape[-1] // n, self.scales)
        out = g * s[..., :1]
        if self.scales == 2:
            out = out + s[..., 1:]
        return out.reshape(shape).to(dtype)

    def round_trip(self, x: Tensor, value: bool = False) -> Tensor:
        """Keys ``x``, or values (``value``), as the cache gives them back (``x`` itself, for a
        float format of its dtype)."""
        if not self.quantized and x.dtype == self.dtype:
            return x
        return self.dequantize(*self.quantize(x, value=value), x.dtype, value)


def writer_fits(device: torch.device | str) -> int:
    """The int4 refits a cache on ``device`` writes with: :data:`INT4_FITS` on the CPU (the C
    writer, or torch's where the native kernels do not build), 0 elsewhere (see the module
    docstring)."""
    return INT4_FITS if torch.device(device).type == "cpu" else 0


def tree_sum(x: Tensor) -> Tensor:
    """``x`` (..., 2^k) summed over its last dimension in one fixed order, adjacent pairs first,
    then pairs of those (keepdim): the C writer's order, so both round alike."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x


def _int4_codes(g: Tensor, scale: Tensor, lo: Tensor) -> Tensor:
    div = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round((g - lo) / div), 0, 15)


def _int4_error(g: Tensor, scale: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
    """The squared error of ``g``'s round trip through float16 ``(scale, lo)``, and its codes."""
    s, m = scale.float(), lo.float()
    codes = _int4_codes(g, s, m)
    e = (codes * s + m) - g
    return tree_sum(e * e), codes


def int4_fit(g: Tensor, fits: int = INT4_FITS) -> tuple[Tensor, Tensor, Tensor]:
    """Float16 ``(scale, min)`` (..., 1) of each group of ``g`` (..., n, float32; n a power of two) as the int4
    writer picks them (see the module docstring), with ``fits`` refits, and the group's codes
    (float, 0-15) under them: every operation rounds as ``csrc/kv_quant.c``'s (whose ``fits`` is
    :data:`INT4_FITS`)."""
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s0 = (hi - lo) / 15
    best_s, best_m = s0.half(), lo.half()
    if fits == 0:
        return best_s, best_m, _int4_codes(g, best_s.float(), best_m.float())
    best, best_codes = _int4_error(g, best_s, best_m)
    d, n = g - lo, g.shape[-1]
    codes = _int4_codes(d, s0, torch.zeros_like(s0))
    for _ in range(fits):
        sc, scc = tree_sum(codes), tree_sum(codes * codes)
        sd, scd = tree_sum(d), tree_sum(codes * d)
        det, num = n * scc - sc * sc, n * scd - sc * sd
        fs = num / torch.where(det > 0, det, torch.ones_like(det))
        ok = (det > 0) & (fs > 0)
        fm = (sd - fs * sc) / n
        s, m = torch.where(ok, fs, s0).half(), torch.where(ok, lo + fm, lo).half()
        err, codes = _int4_error(g, s, m)  # the next fit starts from this pair's codes
        take = err < best
        best, best_s, best_m = torch.where(take, err, best), torch.where(take, s, best_s), torch.where(take, m, best_m)
        best_codes = torch.where(take, codes, best_codes)
    return best_s, best_m, best_codes


def hadamard(n: int = ROTATION, device: torch.device | str = "cpu") -> Tensor:
    """The orthonormal ``n`` x ``n`` Walsh-Hadamard matrix in float32 (Sylvester's order: entries
    +-1/sqrt(n); symmetric, its own inverse); ``n`` a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / n**0.5).to(device=device, dtype=torch.float32)


def rotate_heads(x: Tensor, h: Tensor) -> Tensor:
    """``x`` (..., head_dim) times ``h`` (n x n) in each run of ``n`` values, in float32 (float64
    for float64), rounded once to ``x``'s dtype. A bfloat16 ``x`` on the CPU is multiplied in
    bfloat16 (``h``'s entries, +-1/8, are exact there; oneDNN's products are exact and summed in
    float32, then rounded once): the float32 product's values, without its two float32 copies (a
    head whose 64 terms span more than 2^16 may sum in another order: within a bfloat16 step)."""
    n = h.shape[0]
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # one 2-D product (a strided batch is slow)
        return (x.contiguous().view(-1, n) @ h.to(torch.bfloat16)).view(x.shape)
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf.unflatten(-1, (-1, n)) @ h.to(xf.dtype)).flatten(-2).to(x.dtype)


FORMATS = {
    "float32": KVFormat("float32", torch.float32),
    "bfloat16": KVFormat("bfloat16", torch.bfloat16),
    "float16": KVFormat("float16", torch.float16),
    "int8": KVFormat("int8", torch.int8, 1),
    "int4": KVFormat("int4", torch.uint8, 2),
    "fp8": KVFormat("fp8", torch.float8_e4m3fn, 1),
}


def resolve_kv_format(name: str, dtype: torch.dtype, device: torch.device | str, head_dim: int) -> KVFormat:
    """The format ``name`` ("auto": the activations' own dtype) for a model in ``dtype`` on
    ``device`` with heads of ``head_dim`` (see the module docstring)."""
    if name not in KV_CACHE_DTYPES:
        raise UserError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    act = next((n for n, d in _FLOATS.items() if d == dtype), None)
    if name == "auto":
        if act is None:
            raise UserError(f"no KV cache format for activations in {dtype}")
        return FORMATS[act]
    if name in _FLOATS:
        if _FLOATS[name] != dtype:
            raise UserError(
                f"a {name} KV cache needs a {name} model; this one runs in {act or dtype} "
                f"(pass --dtype {name}, or --kv-cache-dtype auto, int8 or int4)"
            )
        return FORMATS[name]
    if name == "fp8" and torch.device(device).type != "cuda":
        raise UserError("--kv-cache-dtype fp8 runs on CUDA only; on CPU use int8 (the same bytes, more accurate)")
    if head_dim % GROUP:
        raise UserError(f"a quantized KV cache needs head_dim a multiple of {GROUP}, and this model's is {head_dim}")
    return FORMATS[name]
