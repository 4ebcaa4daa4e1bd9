"""Weight-only quantized weights: the formats, the modules that hold them, and GGUF's blocks.

Contract:

* Two formats, both "codes in groups, a float32 scale (and optionally a minimum) per (output row,
  group)", with ``w = code * scale (+ min)`` computed in float32:

  - ``int8``: signed codes, ``qweight`` int8 (out, in); ``group`` = ``in`` (one scale per output
    channel, symmetric: :func:`quantize`'s default) or 16..128 (GGUF's Q8_0 and Q6_K).
  - ``int4``: codes 0..15, two per byte, ``qweight`` uint8 (out, in / 2) (input 2j in the low
    nibble, 2j + 1 in the high one); groups of 32, 64 or 128 inputs, each with a scale and a minimum
    (llama.cpp's Q4_1 scheme; Q4_0 and Q4_K map onto it exactly).

  ``scales`` and ``mins`` are float32 (out, in / group); ``mins`` may be absent (zero). int4's
  from :func:`quantize` (and GGUF's Q4_0 / Q4_1) are float16 values, which the CPU kernel then
  stores in half the bytes.
* :class:`QuantizedLinear` holds one such weight in that natural layout (what a checkpoint stores:
  ``<name>.qweight``, ``<name>.scales``, ``<name>.mins``); its own ``forward`` multiplies by the
  dequantized weight (the plain reference). The engine swaps it for the native kernel's panels on
  CPU. :class:`QuantizedEmbedding` looks rows up from the same codes (a tied head shares them).
* :func:`from_gguf` maps a GGUF tensor's blocks onto a format without a float copy: Q8_0 -> int8
  groups of 32, Q6_K -> int8 groups of 16, Q4_0 / Q4_1 / Q4_K -> int4 groups of 32; the products
  are exact in float32, so the dequantized weight equals the ``gguf`` package's bit for bit. Any
  other quantized type raises :class:`UnmappableQuantizationError` naming it. The native CPU
  kernels decode in one pass where they build (``csrc/linear.c``), numpy otherwise: the same bits.
* Whatever a weight's size, :func:`quantize`, :meth:`QuantizedLinear.dequantize` and the numpy
  decoding work :data:`CHUNK` weights at a time (rows are independent): temporaries of tens of
  megabytes at most, never a float32 copy of a whole table.
* A bad format, group size or shape raises ``ValueError`` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError

FORMATS = ("int8", "int4")
CHUNK = 1 << 22  # weights quantized, dequantized or decoded at a time (a few ops each: few thread joins)
GROUPS = {"int8": (16, 32, 64, 128), "int4": (32, 64, 128)}  # int8 also takes one group per row
QUANTIZE_CHOICES = ("auto", "none", *FORMATS)  # what a loader or the engine is told to run


class UnmappableQuantizationError(UserError):
    """A stored quantized type this project cannot hold as it is."""


def check_quantize(quantize: str, group_size: int | None = None) -> None:
    """Raise ``UserError`` naming a bad ``quantize`` / ``group_size`` pair."""
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if group_size is not None:
        if quantize not in FORMATS:
            raise UserError(f"a group size applies to quantize int8 or int4, not {quantize!r}")
        if group_size not in GROUPS[quantize]:
            raise UserError(
                f"{quantize} group size must be one of {', '.join(map(str, GROUPS[quantize]))}, got {group_size!r}"
            )


class QuantizedLinear(nn.Module):
    """A bias-free linear layer over a quantized weight (see the module docstring for the layout)."""

    def __init__(self, qweight: Tensor, scales: Tensor, mins: Tensor | None, in_features: int) -> None:
        super().__init__()
        fmt = {torch.int8: "int8", torch.uint8: "int4"}.get(qweight.dtype)
        if fmt is None or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 or uint8 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        out = qweight.shape[0]
        packed_in = in_features if fmt == "int8" else in_features // 2
        if qweight.shape[1] != packed_in or (fmt == "int4" and in_features % 2):
            raise ValueError(
                f"{fmt} qweight of {in_features} inputs must be ({out}, {packed_in}), got {tuple(qweight.shape)}"
            )
        if scales.dim() != 2 or scales.shape[0] != out or scales.shape[1] < 1 or in_features % scales.shape[1]:
            raise ValueError(
                f"scales must be ({out}, groups) with groups dividing {in_features}, got {tuple(scales.shape)}"
            )
        if mins is not None and mins.shape != scales.shape:
            raise ValueError(f"mins must have the scales' shape {tuple(scales.shape)}, got {tuple(mins.shape)}")
        self.fmt = fmt
        self.in_features, self.out_features = in_features, out
        self.group = in_features // scales.shape[1]
        if not (fmt == "int8" and self.group == in_features) and self.group not in GROUPS[fmt]:
            raise ValueError(f"{fmt} groups of {self.group} inputs are not supported (known: {GROUPS[fmt]})")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("mins", None if mins is None else mins.float())

    def codes(self) -> Tensor:
        """The codes, one per weight (out, in): int8, or uint8 0..15."""
        return self.qweight if self.fmt == "int8" else unpack_nibbles(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (out, in): ``code * scale (+ min)`` in float32, then ``dtype``; built
        :data:`CHUNK` weights at a time (no float32 copy of a whole large table)."""
        n, k = self.out_features, self.in_features
        if n * k <= CHUNK:
            return self.rows(0, n).to(dtype)
        out = torch.empty(n, k, dtype=dtype, device=self.qweight.device)
        for a, b in row_chunks(n, k):
            out[a:b] = self.rows(a, b)
        return out

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the weight, dequantized (float32)."""
        q = self.qweight[start:stop]
        codes = q if self.fmt == "int8" else unpack_nibbles(q)
        mins = None if self.mins is None else self.mins[start:stop]
        return dequantize_rows(codes, self.scales[start:stop], mins, self.group)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def tensors(self) -> dict[str, Tensor]:
        """What a checkpoint stores for this layer, by suffix."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.mins is not None:
            out["mins"] = self.mins
        return out

    def extra_repr(self) -> str:
        group = "per channel" if self.group == self.in_features else f"groups of {self.group}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.fmt} {group}"


def unpack_nibbles(packed: Tensor) -> Tensor:
    """int4 codes two per byte (rows, in / 2), input 2j in the low nibble -> (rows, in) uint8."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def pack_nibbles(codes: Tensor) -> Tensor:
    """:func:`unpack_nibbles` undone: codes 0..15 (rows, in) -> (rows, in / 2) uint8."""
    pairs = codes.view(codes.shape[0], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of about :data:`CHUNK` weights each (at least one row)."""
    step = max(1, CHUNK // max(cols, 1))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def default_group(fmt: str, in_features: int) -> int:
    """The group size a format takes when none is given: int8 one per output channel, int4 32."""
    return in_features if fmt == "int8" else 32


def dequantize_rows(codes: Tensor, scales: Tensor, mins: Tensor | None, group: int) -> Tensor:
    n, k = codes.shape
    w = codes.float().view(n, k // group, group) * scales[..., None]
    if mins is not None:
        w = w + mins[..., None]
    return w.view(n, k)


class QuantizedEmbedding(nn.Module):
    """An embedding table whose rows are dequantized on lookup from a :class:`QuantizedLinear`'s
    codes (vocab, hidden), into ``dtype``: a tied head and the table share one copy."""

    def __init__(self, table: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype

    def forward(self, ids: Tensor) -> Tensor:
        t = self.table
        flat = ids.reshape(-1)
        codes = t.qweight[flat]
        if t.fmt == "int4":
            codes = unpack_nibbles(codes)
        mins = None if t.mins is None else t.mins[flat]
        rows = dequantize_rows(codes, t.scales[flat], mins, t.group)
        return rows.to(self.dtype).view(*ids.shape, t.in_features)


def quantize(weight: Tensor | QuantizedLinear, fmt: str, group: int | None = None) -> QuantizedLinear:
    """``weight`` (out, in) quantized: ``int8`` symmetric (``scale = max|w| / 127`` per row or group,
    1 where all zero), ``int4`` asymmetric (``min`` the group's minimum and ``scale = (max - min) /
    15``, 1 where constant, each moved outward to a float16 value, as GGUF's and GPTQ's are float16:
    the CPU kernel then reads them in half the bytes; a group past float16's range keeps float32's);
    codes rounded to nearest. Rows are independent, so they
    are done :data:`CHUNK` weights at a time, in place in a float32 copy of the chunk (temporaries
    of about 5 bytes a weight of one chunk, whatever the size; a quantized ``weight`` is
    dequantized a chunk at a time)."""
    check_quantize(fmt, group)
    if fmt not in FORMATS:
        raise ValueError(f"quantize a weight to int8 or int4, not {fmt!r}")
    if isinstance(weight, QuantizedLinear):
        n, k = weight.out_features, weight.in_features
        rows = weight.rows  # a new tensor
    else:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"quantize: a floating (out, in) weight, got {weight.dtype} {tuple(weight.shape)}")
        n, k = weight.shape
        w = weight.detach()

        def rows(a: int, b: int) -> Tensor:
            return w[a:b].to(torch.float32, copy=True)  # worked on in place

    group = group or default_group(fmt, k)
    if k % group:
        raise ValueError(f"{fmt} groups of {group} need the input size ({k}) to be a multiple of it")
    groups = k // group
    scales = torch.empty(n, groups)
    if fmt == "int8":
        q = torch.empty(n, k, dtype=torch.int8)
        for a, b in row_chunks(n, k):
            x = rows(a, b).reshape(b - a, groups, group)
            low, high = torch.aminmax(x, dim=-1)
            s = torch.maximum(high, low.neg_()) / 127  # max |w|
            s = torch.where(s > 0, s, torch.ones_like(s))
            q[a:b] = x.div_(s[..., None]).round_().clamp_(-127, 127).view(b - a, k)
            scales[a:b] = s
        return QuantizedLinear(q, scales, None, k)
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    mins = torch.empty(n, groups)
    for a, b in row_chunks(n, k):
        x = rows(a, b).reshape(b - a, groups, group)
        low, high = torch.aminmax(x, dim=-1)
        low = _to_half_value(low, up=False)
        s = torch.where(high > low, _to_half_value((high - low) / 15, up=True), torch.ones_like(low))
        codes = x.sub_(low[..., None]).div_(s[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        packed[a:b] = pack_nibbles(codes.view(b - a, k))
        scales[a:b], mins[a:b] = s, low
    return QuantizedLinear(packed, scales, mins, k)


def _to_half_value(t: Tensor, up: bool) -> Tensor:
    """float32 ``t`` moved to the nearest float16 value at or above it (``up``) or at or below it,
    as float32; a value past float16's range stays as it is."""
    h = t.to(torch.float16)
    past = h.float() < t if up else h.float() > t
    h = torch.where(past, torch.nextafter(h, torch.full_like(h, float("inf") if up else float("-inf"))), h)
    return torch.where(torch.isfinite(h), h.float(), t)


def stack(parts: Sequence[QuantizedLinear]) -> QuantizedLinear | None:
    """One layer computing ``parts`` stacked by output (fused projections), or None where their
    formats or groups differ."""
    first = parts[0]
    if any(
        (p.fmt, p.group, p.in_features, p.mins is None)
        != (first.fmt, first.group, first.in_features, first.mins is None)
        for p in parts
    ):
        return None
    mins = None if first.mins is None else torch.cat([p.mins for p in parts])
    return QuantizedLinear(
        torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), mins, first.in_features
    )


# ---------------------------------------------------------------------------------------- GGUF
def _f16(block: np.ndarray, at: int) -> np.ndarray:
    return block[:, at : at + 2].copy().view(np.float16).astype(np.float32)[:, 0]


def _pack_halves(qs: np.ndarray) -> np.ndarray:
    """ggml's nibble layout over runs of ``L`` bytes (the last axis; weight j < L in byte j's low
    nibble, weight L + j in its high one) -> the same 2 L codes packed two per byte in weight order
    (:func:`pack_nibbles`' layout: weight 2m in byte m's low nibble, 2m + 1 in its high one)."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(even & 15) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=-1)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of packed 6-bit scales and mins -> (blocks, 8) each."""
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def _decode(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A tensor's blocks (count, bytes per block) -> codes (count, weights per block: int8 codes,
    or int4 codes already packed two per byte, count x weights / 2), scales and mins (count,
    groups per block)."""
    b = blocks
    if kind == "Q8_0":
        return b[:, 2:].copy().view(np.int8), _f16(b, 0)[:, None], None
    if kind == "Q4_0":
        d = _f16(b, 0)[:, None]
        return _pack_halves(b[:, 2:]), d, -8 * d
    if kind == "Q4_1":
        return _pack_halves(b[:, 4:]), _f16(b, 0)[:, None], _f16(b, 2)[:, None]
    if kind == "Q4_K":
        d, dmin = _f16(b, 0)[:, None], _f16(b, 2)[:, None]
        sc, mn = _k_scales_mins(b[:, 4:16])
        # 4 runs of 32 bytes: sub-block 2i in run i's low nibbles, 2i + 1 in its high ones
        packed = _pack_halves(b[:, 16:].reshape(-1, 4, 32)).reshape(-1, 128)
        return packed, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    if kind == "Q6_K":
        ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
        sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = _f16(b, 208)[:, None]
        low = np.concatenate([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-1)
        high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
        codes = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(-1, 256)
        return codes, d * sc, None
    raise UnmappableQuantizationError(kind)


GGUF_TYPES = ("Q8_0", "Q6_K", "Q4_0", "Q4_1", "Q4_K")  # what :func:`from_gguf` maps
# weights per block, bytes per block, and the format and group size each maps onto
GGUF_BLOCKS = {
    "Q8_0": (32, 34, "int8", 32),
    "Q6_K": (256, 210, "int8", 16),
    "Q4_0": (32, 18, "int4", 32),
    "Q4_1": (32, 20, "int4", 32),
    "Q4_K": (256, 144, "int4", 32),
}


def gguf_row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one row of ``in_features`` weights in GGUF type ``kind`` (one of :data:`GGUF_TYPES`)."""
    per_block, block_bytes, _, _ = GGUF_BLOCKS[kind]
    if in_features % per_block:
        raise ValueError(f"GGUF {kind} rows hold whole blocks of {per_block} weights, not {in_features}")
    return in_features // per_block * block_bytes


def from_gguf(data: np.ndarray, kind: str, shape: tuple[int, int]) -> QuantizedLinear:
    """A GGUF tensor of type ``kind`` (its raw blocks ``data``, uint8 (rows, bytes per row)) of
    logical ``shape`` (out, in) as a :class:`QuantizedLinear`, without a float copy, decoded into
    the layer's own tensors: in one pass by the native CPU kernels where they build, else by
    :data:`CHUNK` weights at a time with numpy (the reference; the same bits)."""
    if kind not in GGUF_BLOCKS:
        raise UnmappableQuantizationError(
            f"GGUF type {kind} has no quantized format here (mapped: {', '.join(GGUF_TYPES)})"
        )
    n, k = shape
    _, block_bytes, fmt, group = GGUF_BLOCKS[kind]
    data = np.ascontiguousarray(data).reshape(n, gguf_row_bytes(kind, k))
    qweight = torch.empty(n, k if fmt == "int8" else k // 2, dtype=torch.int8 if fmt == "int8" else torch.uint8)
    scales = torch.empty(n, k // group)
    mins = None if kind in ("Q8_0", "Q6_K") else torch.empty(n, k // group)
    lib = _native()
    if lib is not None and n * k:
        blocks = data.size // block_bytes
        codes = GGUF_TYPES_NATIVE.index(kind)
        mins_at = None if mins is None else mins.data_ptr()
        if lib.minicpm_gguf_decode(codes, data.ctypes.data, blocks, qweight.data_ptr(), scales.data_ptr(), mins_at):
            raise RuntimeError(f"the native GGUF decoder refused type {kind}")
        return QuantizedLinear(qweight, scales, mins, k)
    for a, b in row_chunks(n, k):
        codes, sc, mn = _decode(kind, data[a:b].reshape(-1, block_bytes))
        qweight[a:b] = torch.from_numpy(codes.reshape(b - a, -1))
        scales[a:b] = torch.from_numpy(sc.reshape(b - a, -1))
        if mins is not None:
            mins[a:b] = torch.from_numpy(mn.reshape(b - a, -1))
    return QuantizedLinear(qweight, scales, mins, k)


GGUF_TYPES_NATIVE = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")  # csrc/linear.c's numbering


def _native() -> object | None:
    """The native CPU kernels (None where they are off or don't build: numpy decodes)."""
    from .engine.cpu_kernels import native_kernels

    return native_kernels()


# ------------------------------------------------------------------------------- whole models
def to_format(w: Tensor | QuantizedLinear, fmt: str, group_size: int | None = None) -> QuantizedLinear:
    """``w`` (a float weight or a quantized layer) in ``fmt`` and ``group_size``: itself where it
    already is, else quantized from its (dequantized) weight."""
    if isinstance(w, QuantizedLinear) and (w.fmt, w.group) == (fmt, group_size or default_group(fmt, w.in_features)):
        return w
    return quantize(w, fmt, group_size)  # a quantized w is dequantized a chunk at a time


def linear_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every bias-free linear layer, float or quantized, once each; the
    tables of quantized embeddings are not linear layers here (a tied head is found as the head)."""
    slots = []
    for parent in model.modules():
        if isinstance(parent, QuantizedEmbedding):
            continue
        for name, child in parent.named_children():
            if isinstance(child, QuantizedLinear) or (type(child) is nn.Linear and child.bias is None):
                slots.append((parent, name, child))
    return slots


def to_float_linear(layer: QuantizedLinear, dtype: torch.dtype) -> nn.Linear:
    """A float ``nn.Linear`` with ``layer``'s dequantized weight."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)
    return linear


def head_format(w: Tensor | QuantizedLinear, fmt: str, group_size: int | None = None) -> QuantizedLinear:
    """The head in ``fmt``, except that int4 keeps it at 8 bits (an int8 head as it is, else int8
    per channel), as llama.cpp keeps its output tensor at 6: every logit reads the whole head, and
    a 4-bit one costs the default model 5.7% perplexity (its int4 decoder layers 0.3%)."""
    if fmt != "int4":
        return to_format(w, fmt, group_size)
    if isinstance(w, QuantizedLinear) and w.fmt == "int8":
        return w
    return to_format(w, "int8")


def quantize_model(model: nn.Module, quantize: str, group_size: int | None = None) -> nn.Module:
    """``model``'s weights in ``quantize``'s format, in place (before projections are fused):

    * ``"auto"``: as they are;
    * ``"none"``: every quantized layer and embedding dequantized into the model's dtype;
    * ``"int8"`` / ``"int4"``: every linear layer in that format and group size (default: int8 per
      channel, int4 groups of 32), the head too except that int4 keeps it at 8 bits
      (:func:`head_format`); a layer already in its format is kept as it is, any other is
      requantized from its (dequantized) weight. The embedding table takes the head's format and
      embeddings are looked up from its codes (:class:`QuantizedEmbedding`; llama.cpp quantizes
      its token table too): a tied table is the head (one copy), an untied one is its own.
    """
    check_quantize(quantize, group_size)
    if quantize == "auto":
        return model
    dtype = model.dtype
    embed = model.model.embed_tokens
    if quantize == "none" and isinstance(embed, QuantizedEmbedding):
        model.model.embed_tokens = nn.Embedding.from_pretrained(embed.table.dequantize(dtype), freeze=True)
        if model.lm_head is embed.table:
            model.lm_head = to_float_linear(embed.table, dtype)
            model.lm_head.weight = model.model.embed_tokens.weight
    if quantize in FORMATS:
        table = head_format(
            embed.table if isinstance(embed, QuantizedEmbedding) else embed.weight, quantize, group_size
        )
        model.model.embed_tokens = QuantizedEmbedding(table, dtype)
        if model.config.tie_word_embeddings:
            model.lm_head = table
    for parent, name, layer in linear_slots(model):
        if quantize == "none":
            if isinstance(layer, QuantizedLinear):
                setattr(parent, name, to_float_linear(layer, dtype))
            continue
        weight = layer if isinstance(layer, QuantizedLinear) else layer.weight
        new = (
            head_format(weight, quantize, group_size)
            if layer is model.lm_head
            else to_format(weight, quantize, group_size)
        )
        if new is not layer:
            setattr(parent, name, new)
    return model


def is_linear_weight(name: str) -> bool:
    """Whether a checkpoint weight (Llama names) is a linear layer's: the projections and the head."""
    return name == "lm_head.weight" or (name.startswith("model.layers.") and name.endswith("_proj.weight"))


def quantize_weight(
    name: str, w: Tensor | QuantizedLinear, quantize: str, dtype: torch.dtype, tied: bool, group_size: int | None = None
) -> Tensor | QuantizedLinear | None:
    """One checkpoint weight (by its name) under :func:`quantize_model`'s rule: "auto" as it is,
    "none" dequantized to ``dtype`` if quantized, "int8" / "int4" in that format if it is a linear
    weight, the embedding table (tied or not) in the head's format; None for a tied head, which is
    then the table."""
    if quantize == "auto":
        return w
    if quantize == "none":
        return w.dequantize(dtype) if isinstance(w, QuantizedLinear) else w
    if tied and name == "lm_head.weight":
        return None  # the table is the head
    if name == "model.embed_tokens.weight":
        return head_format(w, quantize, group_size)
    if not is_linear_weight(name):
        return w
    return (head_format if name == "lm_head.weight" else to_format)(w, quantize, group_size)
