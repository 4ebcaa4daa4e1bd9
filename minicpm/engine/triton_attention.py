"""Triton paged-attention kernels, optional: decode (flash-decoding, split-K) and varlen prefill.

:func:`paged_prefill_attention` (and its plain-PyTorch :func:`paged_prefill_attention_reference`):
causal attention of a step's query chunks, several sequences flattened together, each over its
own cached past and itself, read through its block table in place (nothing gathered):

* ``q``: ``(T, H, D)``, the step's rotated queries, sequence after sequence; ``cu_q``: ``(S + 1,)``
  int32 offsets of each sequence's rows in ``q``; ``context_lens``: ``(S,)`` int32, each
  sequence's tokens in the cache including this chunk's (already written); ``block_tables``:
  ``(S, max_blocks)`` int32. Row ``i`` of sequence ``s`` (its position ``context_lens[s] -
  query_len + i``) attends to keys ``0 .. position``. ``max_query_len`` (a host int) sizes the grid.
* Returns ``(T, H, D)`` in ``q.dtype``; statistics and accumulation in float32.
* Grid ``(cdiv(max_query_len, BLOCK_M), S, H)``; each program walks its key tiles up to its last
  row's position only (what the causal mask would hide is never loaded).

Contract of :func:`paged_decode_attention` (and of the plain-PyTorch
:func:`paged_decode_attention_reference`, which tests compare against):

* ``q``: ``(B, H, D)``, one already-rotated query token per sequence, bf16/fp16/fp32.
* ``k_cache``/``v_cache``: ``(num_blocks, block_size, KV, D)``, one layer's paged cache,
  same dtype and device as ``q``. ``H % KV == 0``; query head ``h`` reads kv head
  ``h // (H // KV)`` (GQA). ``D`` is a power of two in ``[16, 256]``.
* ``block_tables``: ``(B, max_blocks)`` int32; row ``b`` lists the physical block ids of
  sequence ``b`` in order. Entries past ``cdiv(context_lens[b], block_size)`` are padding
  (any value, e.g. ``-1``) and are never read.
* ``context_lens``: ``(B,)`` int32, tokens of sequence ``b`` in the cache (the current token's
  K/V already written). Values are clamped to ``max_blocks * block_size``. A row with
  ``context_len == 0`` yields zeros and reads nothing from the cache (padded CUDA-graph rows).
* Returns ``(B, H, D)`` in ``q.dtype``: ``softmax(q @ k.T * scale) @ v`` over the first
  ``context_len`` tokens, softmax statistics and accumulation in float32.

A quantized cache (both kernels; the formats of :mod:`minicpm.engine.attention.kv_format`), read
in place: ``kv_format`` names it (``"int8"``, ``"int4"``, ``"fp8"``; None or a float format's
name: the caches hold values, as above), ``k_cache``/``v_cache`` hold its codes (``(num_blocks,
block_size, KV, code width)``: int8 ``D`` int8 codes, int4 ``D / 2`` uint8 bytes, fp8 ``D``
float8_e4m3fn codes) and ``k_scale``/``v_scale`` its float16 scales indexed by the same block,
slot and head (``(num_blocks, block_size, KV, scale width)``: ``D / 32`` scales, int4 ``D / 16``
as ``scale, min`` pairs for keys and ``D / 32`` pairs for values where ``D`` is a multiple of 64,
one pair per 64 values (``KVFormat.group``); contiguous last dimension); ``D`` is then a
multiple of 32. Each tile of keys and values is dequantized in registers as it is loaded, in
float32 and then rounded to ``q.dtype`` (what ``KVFormat.dequantize(codes, scales, q.dtype)``
gives, the values the reference backend reads): int8 and fp8 ``code * scale``, int4 ``code *
scale + min`` with value ``j`` of a run of 32 in the low nibble of its byte ``j`` and value
``j + 16`` in the high one. fp8 codes are decoded from their bits through float16 (exact for
every finite e4m3 code), so no architecture's native fp8 conversion is needed. No dequantized
copy of the context is made; scores and accumulation are as above. The float path's code is
unchanged (a constexpr branch). The wrappers check codes and scales (dtype, widths, shapes,
device, layout) and raise a ``ValueError`` naming the problem; the references take values only
(tests give them the dequantized cache).

Implementation: kernel 1 runs on grid ``(B, KV, splits)`` with ``splits = min(cdiv(max_blocks *
block_size, partition_size), max_splits)`` (16 by default), computed from static shapes only.
Each program handles all ``H // KV`` query heads of its kv head (each K/V tile is loaded once
for the group) and walks every ``splits``-th ``partition_size``-token slice of its sequence, up
to that sequence's real ``context_len`` (so the work follows the real lengths: a 70k sequence in
a graph sized for 128k does not make 48 short ones launch programs per partition), merging them
as it goes; it writes one unnormalised partial output plus its running max / sum (max = -inf,
sum = 0 for a split that saw no token). Kernel 2 (grid ``(B, H)``) merges the partials with
log-sum-exp. There is no host synchronisation, so the call is CUDA-graph capturable
(the intermediate buffers come from ``torch.empty`` in the wrapper).

Triton is optional: this module imports without it (``TRITON_AVAILABLE`` is then False
and :func:`paged_decode_attention` raises ``RuntimeError``). The kernels need CUDA tensors,
or ``TRITON_INTERPRET=1`` set before this module is first imported (CPU interpreter, tests).
"""

# ruff: noqa: N803  (Triton convention: upper-case tl.constexpr kernel parameters)
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = [
    "TRITON_AVAILABLE",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_TILE = 64  # tokens per inner tile (a tile may span several cache blocks)
# Quantized cache formats the kernels read in place (kv_format name -> the FMT constexpr; 0 is a
# float cache, the plain path), their codes' dtypes and codes / float16 scales per row of D values.
_FORMAT_TAGS = {"int8": 1, "int4": 2, "fp8": 3}
_FLOAT_FORMATS = (None, "float32", "bfloat16", "float16")
_CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
_GROUP = 32  # values per scale along D (minicpm.engine.attention.kv_format.GROUP)
_VALUE_GROUP = 64  # int4 values per scale where D allows (kv_format.VALUE_GROUP)


def _code_width(kv_format: str, D: int) -> int:
    return D // 2 if kv_format == "int4" else D


def _group(kv_format: str, D: int, value: bool = False) -> int:
    """Values per scale of a key row, or of a value row (``value``): kv_format.KVFormat.group."""
    return _VALUE_GROUP if value and kv_format == "int4" and D % _VALUE_GROUP == 0 else _GROUP


def _scale_width(kv_format: str, D: int, value: bool = False) -> int:
    return D // _group(kv_format, D, value) * (2 if kv_format == "int4" else 1)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _format_tag(kv_format, k_scale, v_scale) -> int:
    """The kernels' FMT constexpr for ``kv_format``: 0 for a float cache (which takes no scales)."""
    if kv_format in _FLOAT_FORMATS:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale given for a float cache (kv_format {kv_format!r})")
        return 0
    if kv_format not in _FORMAT_TAGS:
        raise ValueError(
            f"kv_format must be None, a float format or one of {', '.join(_FORMAT_TAGS)}, got {kv_format!r}"
        )
    return _FORMAT_TAGS[kv_format]


def _check_quantized(q, k_cache, v_cache, k_scale, v_scale, kv_format) -> None:
    """A quantized cache (codes and float16 scales, one layer) that fits ``q`` (see the module docstring)."""
    D = q.shape[-1]
    if D % _GROUP:
        raise ValueError(f"a {kv_format} cache needs a head dim D that is a multiple of {_GROUP}, got D={D}")
    want = _CODE_DTYPES[kv_format]
    if k_cache.dtype != want or v_cache.dtype != want:
        raise ValueError(
            f"a {kv_format} cache holds {want} codes, got k_cache {k_cache.dtype}, v_cache {v_cache.dtype}"
        )
    width = _code_width(kv_format, D)
    if k_cache.shape[3] != width:
        raise ValueError(
            f"head dim mismatch: q has D={D}, so a {kv_format} cache row holds {width} codes, got {k_cache.shape[3]}"
        )
    if k_scale is None or v_scale is None:
        raise ValueError(f"a {kv_format} cache needs its float16 scales: pass k_scale and v_scale")
    for name, t, value in (("k_scale", k_scale, False), ("v_scale", v_scale, True)):
        shape = (*k_cache.shape[:3], _scale_width(kv_format, D, value))
        if t.dtype != torch.float16:
            raise ValueError(f"{name} must be float16 scales, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} for this {kv_format} cache, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
        if t.stride(3) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")


def _check_inputs(
    q, k_cache, v_cache, block_tables, context_lens, partition_size, k_scale=None, v_scale=None, kv_format=None
) -> int:
    """The decode contract's checks; returns the format's FMT tag."""
    tag = _format_tag(kv_format, k_scale, v_scale)
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (num_blocks, block_size, KV, D), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    B, H, D = q.shape
    _, block_size, KV, Dk = k_cache.shape
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of {_SUPPORTED_DTYPES}, got {q.dtype}")
    if tag:
        _check_quantized(q, k_cache, v_cache, k_scale, v_scale, kv_format)
    else:
        if Dk != D:
            raise ValueError(f"head dim mismatch: q has D={D}, cache has D={Dk}")
        if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if KV == 0 or H % KV != 0:
        raise ValueError(f"num query heads H={H} must be a multiple of num kv heads KV={KV}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be (B={B}, max_blocks), got shape {tuple(block_tables.shape)}")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if context_lens.shape != (B,):
        raise ValueError(f"context_lens must be (B={B},), got shape {tuple(context_lens.shape)}")
    if context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens must be int32, got {context_lens.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if not _is_pow2(partition_size) or partition_size < 16:
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    return tag


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int = 512,
) -> torch.Tensor:
    """Plain-PyTorch float32 reference with the same contract (``partition_size`` is ignored)."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, partition_size)
    B, H, D = q.shape
    _, block_size, KV, _ = k_cache.shape
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for b in range(B):
        n = min(int(context_lens[b]), block_tables.shape[1] * block_size)
        if n <= 0:
            continue
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].reshape(-1, KV, D)[:n].float().repeat_interleave(H // KV, dim=1)  # (n, H, D)
        v = v_cache[blocks].reshape(-1, KV, D)[:n].float().repeat_interleave(H // KV, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v)
    return out.to(q.dtype)


def _check_prefill(q, k_cache, v_cache, block_tables, cu_q, context_lens, k_scale=None, v_scale=None, kv_format=None):
    """The prefill contract's checks; returns the format's FMT tag."""
    tag = _format_tag(kv_format, k_scale, v_scale)
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q must be (T, H, D) and the caches (num_blocks, block_size, KV, D), got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    H, D = q.shape[1:]
    KV = k_cache.shape[2]
    if (not tag and k_cache.shape[3] != D) or KV == 0 or H % KV != 0:
        raise ValueError(f"q (H={H}, D={D}) does not fit the cache (KV={KV}, D={k_cache.shape[3]})")
    if tag:
        if q.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"q dtype must be one of {_SUPPORTED_DTYPES}, got {q.dtype}")
        _check_quantized(q, k_cache, v_cache, k_scale, v_scale, kv_format)
    elif q.dtype not in _SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"dtypes must match and be one of {_SUPPORTED_DTYPES}: q {q.dtype}, cache {k_cache.dtype}")
    S = context_lens.shape[0]
    if cu_q.shape != (S + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != S:
        raise ValueError(
            f"cu_q must be (S + 1,) and block_tables (S, max_blocks) for S={S} sequences, got "
            f"{tuple(cu_q.shape)} and {tuple(block_tables.shape)}"
        )
    for name, t in (("cu_q", cu_q), ("context_lens", context_lens), ("block_tables", block_tables)):
        if t.dtype != torch.int32 or t.device != q.device:
            raise ValueError(f"{name} must be int32 on {q.device}, got {t.dtype} on {t.device}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"the caches must be on {q.device}, got {k_cache.device} and {v_cache.device}")
    return tag


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-PyTorch float32 reference of :func:`paged_prefill_attention` (gathers; for tests)."""
    _check_prefill(q, k_cache, v_cache, block_tables, cu_q, context_lens)
    T, H, D = q.shape
    _, block_size, KV, _ = k_cache.shape
    out = torch.zeros(T, H, D, dtype=torch.float32, device=q.device)
    for s in range(context_lens.shape[0]):
        start, end, ctx = int(cu_q[s]), int(cu_q[s + 1]), int(context_lens[s])
        if end == start:
            continue
        blocks = block_tables[s, : -(-ctx // block_size)].long()
        k = k_cache[blocks].reshape(-1, KV, D)[:ctx].float().repeat_interleave(H // KV, dim=1)
        v = v_cache[blocks].reshape(-1, KV, D)[:ctx].float().repeat_interleave(H // KV, dim=1)
        scores = torch.einsum("thd,nhd->htn", q[start:end].float(), k) * scale
        positions = torch.arange(ctx - (end - start), ctx, device=q.device)
        hidden = torch.arange(ctx, device=q.device)[None, :] > positions[:, None]
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        out[start:end] = torch.einsum("htn,nhd->thd", probs, v)
    return out.to(q.dtype)


if TRITON_AVAILABLE:

    @triton.jit
    def _dequantize_tile(
        code_ptr, scale_ptr, rows, scale_rows, ok, offs_d, stride_cd, FMT: tl.constexpr, SG: tl.constexpr
    ):
        """(TILE, D) float32 values of a tile of a quantized cache: ``rows`` / ``scale_rows`` are each
        token's offsets of its codes / float16 scales (contiguous), ``ok`` masks tokens (their values
        are 0). FMT 1: int8, ``code * scale``; 2: int4, value ``j`` and ``j + 16`` of each run of 32
        in the low / high nibble of its byte ``j``, ``code * scale + min``, a (scale, min) pair per
        SG values; 3: fp8 e4m3 codes as bytes, ``code * scale``."""
        group = offs_d // 32
        mask = ok[:, None]
        if FMT == 2:
            byte = group * 16 + offs_d % 16  # each byte read for both of its values (cached)
            packed = tl.load(code_ptr + rows[:, None] + byte[None, :] * stride_cd, mask=mask, other=0).to(tl.int32)
            codes = (packed >> ((offs_d // 16) % 2 * 4)[None, :]) & 0xF
            pair = 2 * (offs_d // SG)
            scale = tl.load(scale_ptr + scale_rows[:, None] + pair[None, :], mask=mask, other=0.0)
            low = tl.load(scale_ptr + scale_rows[:, None] + pair[None, :] + 1, mask=mask, other=0.0)
            x = codes.to(tl.float32) * scale.to(tl.float32) + low.to(tl.float32)
        else:
            raw = tl.load(code_ptr + rows[:, None] + offs_d[None, :] * stride_cd, mask=mask, other=0)
            scale = tl.load(scale_ptr + scale_rows[:, None] + group[None, :], mask=mask, other=0.0).to(tl.float32)
            if FMT == 1:
                x = raw.to(tl.float32) * scale
            else:
                # e4m3 bits s.eeee.mmm moved into float16's s.eeeee.mmmmmmmmmm read 2^8 too small
                # (exactly, subnormals included: both exponents start at the same place), on any
                # GPU architecture (no native fp8 conversion needed)
                bits = raw.to(tl.int32)
                half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)
                x = half.to(tl.float32) * (scale * 256.0)
        return x

    @triton.jit
    def _paged_prefill_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        ks_ptr,  # float16 scales of a quantized cache (FMT > 0); unread for a float cache
        vs_ptr,
        bt_ptr,
        cu_ptr,
        ctx_ptr,
        out_ptr,
        qk_scale,  # scale * log2(e)
        stride_qt,
        stride_qh,
        stride_kn,
        stride_kt,
        stride_kh,
        stride_sn,  # the key scales' strides
        stride_st,
        stride_sh,
        stride_vsn,  # the value scales'
        stride_vst,
        stride_vsh,
        stride_btb,
        stride_ot,
        stride_oh,
        VSG: tl.constexpr,  # values per value scale (int4: 64 where D allows; else 32)
        GROUP: tl.constexpr,  # query heads per kv head
        D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,  # query rows per program
        BLOCK_N: tl.constexpr,  # keys per tile
        DOT_PRECISION: tl.constexpr,
        FMT: tl.constexpr,  # 0: float cache; 1 int8, 2 int4, 3 fp8 (codes dequantized in registers)
    ):
        mt = tl.program_id(0)
        s = tl.program_id(1)
        h = tl.program_id(2)
        kvh = h // GROUP
        q_start = tl.load(cu_ptr + s)
        q_len = tl.load(cu_ptr + s + 1) - q_start
        ctx = tl.load(ctx_ptr + s)
        past = ctx - q_len
        rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        offs_d = tl.arange(0, D)
        q = tl.load(
            q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        # keys up to the last real row's position; none for a tile past the chunk's rows
        last = tl.minimum(past + mt * BLOCK_M + BLOCK_M, ctx)
        last = tl.where(mt * BLOCK_M < q_len, last, 0)
        offs_n = tl.arange(0, BLOCK_N)
        for start in range(0, last, BLOCK_N):
            tok = start + offs_n
            tok_ok = tok < last
            blk = tl.load(bt_ptr + s * stride_btb + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
            slot = blk * stride_kn + (tok % BLOCK_SIZE) * stride_kt + kvh * stride_kh
            if FMT == 0:
                k = tl.load(k_ptr + slot[:, None] + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
                v = tl.load(v_ptr + slot[:, None] + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
            else:
                srow = blk * stride_sn + (tok % BLOCK_SIZE) * stride_st + kvh * stride_sh
                vsrow = blk * stride_vsn + (tok % BLOCK_SIZE) * stride_vst + kvh * stride_vsh
                k = _dequantize_tile(k_ptr, ks_ptr, slot, srow, tok_ok, offs_d, 1, FMT, 32).to(q_ptr.dtype.element_ty)
                v = _dequantize_tile(v_ptr, vs_ptr, slot, vsrow, tok_ok, offs_d, 1, FMT, VSG).to(q_ptr.dtype.element_ty)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = tok_ok[None, :] & (tok[None, :] <= (past + rows)[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a padded row sees no key
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )

    @triton.jit
    def _paged_decode_partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        ks_ptr,  # float16 scales of a quantized cache (FMT > 0); unread for a float cache
        vs_ptr,
        bt_ptr,
        ctx_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        qk_scale,  # scale * log2(e): scores live in the log2 domain
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kn,
        stride_kt,
        stride_kh,
        stride_kd,
        stride_vn,
        stride_vt,
        stride_vh,
        stride_vd,
        stride_sn,  # the key scales' strides (contiguous last dimension)
        stride_st,
        stride_sh,
        stride_vsn,  # the value scales'
        stride_vst,
        stride_vsh,
        stride_btb,
        stride_btn,
        max_ctx,  # max_blocks * BLOCK_SIZE
        VSG: tl.constexpr,  # values per value scale (int4: 64 where D allows; else 32)
        H: tl.constexpr,
        SPLITS: tl.constexpr,  # programs per (sequence, kv head), each walking every SPLITS-th partition
        GROUP: tl.constexpr,  # H // KV real query heads per program
        GROUP_PAD: tl.constexpr,  # padded row count (1, or >= 16 for tl.dot)
        D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        PARTITION: tl.constexpr,
        TILE: tl.constexpr,
        USE_DOT: tl.constexpr,  # GROUP > 1: tensor-core dot over the padded head group
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32 rounding)
        FMT: tl.constexpr,  # 0: float cache; 1 int8, 2 int4, 3 fp8 (codes dequantized in registers)
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)

        ctx = tl.minimum(tl.load(ctx_ptr + b), max_ctx)
        num_live = tl.cdiv(tl.maximum(ctx, 0), PARTITION)  # partitions holding tokens

        rows = tl.arange(0, GROUP_PAD)
        row_ok = rows < GROUP
        heads = kvh * GROUP + rows
        offs_d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None],
            other=0.0,
        )  # (GROUP_PAD, D)
        if not USE_DOT:
            q = q.to(tl.float32)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)

        offs_t = tl.arange(0, TILE)
        # this program's partitions: split, split + SPLITS, ... up to the real context only
        for part in range(split, num_live, SPLITS):
            part_start = part * PARTITION
            part_len = tl.minimum(ctx - part_start, PARTITION)
            for t in range(0, tl.cdiv(part_len, TILE)):
                tok = part_start + t * TILE + offs_t
                tok_ok = tok < ctx
                # Physical block of each token; masked so padding table entries are never read.
                blk = tl.load(bt_ptr + b * stride_btb + (tok // BLOCK_SIZE) * stride_btn, mask=tok_ok, other=0)
                blk = blk.to(tl.int64)
                slot = tok % BLOCK_SIZE
                if FMT == 0:
                    k = tl.load(
                        k_ptr
                        + blk[:, None] * stride_kn
                        + slot[:, None] * stride_kt
                        + kvh * stride_kh
                        + offs_d[None, :] * stride_kd,
                        mask=tok_ok[:, None],
                        other=0.0,
                    )  # (TILE, D)
                    v = tl.load(
                        v_ptr
                        + blk[:, None] * stride_vn
                        + slot[:, None] * stride_vt
                        + kvh * stride_vh
                        + offs_d[None, :] * stride_vd,
                        mask=tok_ok[:, None],
                        other=0.0,
                    )
                else:  # codes dequantized in registers, in q's dtype (what the cache gives back)
                    srow = blk * stride_sn + slot * stride_st + kvh * stride_sh
                    vsrow = blk * stride_vsn + slot * stride_vst + kvh * stride_vsh
                    krow = blk * stride_kn + slot * stride_kt + kvh * stride_kh
                    vrow = blk * stride_vn + slot * stride_vt + kvh * stride_vh
                    k = _dequantize_tile(k_ptr, ks_ptr, krow, srow, tok_ok, offs_d, stride_kd, FMT, 32)
                    v = _dequantize_tile(v_ptr, vs_ptr, vrow, vsrow, tok_ok, offs_d, stride_vd, FMT, VSG)
                    k = k.to(q_ptr.dtype.element_ty)
                    v = v.to(q_ptr.dtype.element_ty)
                if USE_DOT:
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                else:
                    s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # (GROUP_PAD, TILE)
                s = tl.where(tok_ok[None, :], s * qk_scale, float("-inf"))
                # Every processed tile holds >= 1 valid token, so m_new is finite.
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if USE_DOT:
                    pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # fp32 accumulate
                else:
                    pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)  # (GROUP_PAD, D)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

        stat_off = (b * H + heads) * SPLITS + split
        tl.store(m_ptr + stat_off, m_i, mask=row_ok)
        tl.store(l_ptr + stat_off, l_i, mask=row_ok)
        # Idle splits only write the neutral (m=-inf, l=0) stats; the reducer skips their acc.
        acc_rows = tl.where(split < num_live, GROUP, 0)
        tl.store(acc_ptr + stat_off[:, None] * D + offs_d[None, :], acc, mask=(rows < acc_rows)[:, None])

    @triton.jit
    def _paged_decode_reduce_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        ctx_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        stride_od,
        max_ctx,
        H: tl.constexpr,
        SPLITS: tl.constexpr,
        D: tl.constexpr,
        PARTS_PAD: tl.constexpr,
        PARTITION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.minimum(tl.load(ctx_ptr + b), max_ctx)
        num_live = tl.minimum(tl.cdiv(tl.maximum(ctx, 0), PARTITION), SPLITS)  # splits that saw tokens

        base = (b * H + h) * SPLITS
        offs_p = tl.arange(0, PARTS_PAD)
        live = offs_p < num_live
        m_all = tl.load(m_ptr + base + offs_p, mask=live, other=float("-inf"))
        l_all = tl.load(l_ptr + base + offs_p, mask=live, other=0.0)
        m_max = tl.max(m_all, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # context_len 0: avoid inf - inf
        l_total = tl.sum(tl.exp2(m_all - m_max) * l_all, axis=0)

        offs_d = tl.arange(0, D)
        acc = tl.zeros([D], dtype=tl.float32)
        for p in range(0, num_live):
            w = tl.exp2(tl.load(m_ptr + base + p) - m_max)
            acc += w * tl.load(acc_ptr + (base + p) * D + offs_d)
        out = acc / tl.where(l_total > 0, l_total, 1.0)  # no live partition: acc == 0 -> zeros
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty))


def _check_launch(name: str, q: torch.Tensor) -> None:
    """What every kernel launch needs: triton, CUDA (or the interpreter), a head dim it tiles."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{name} needs triton, which is not installed")
    D = q.shape[-1]
    if not _is_pow2(D) or not 16 <= D <= 256:
        raise ValueError(f"head dim D must be a power of two in [16, 256], got {D}")
    if not q.is_cuda and not _kernels_interpreted():
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    block_m: int = 64,
    block_n: int = 64,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    kv_format: str | None = None,
) -> torch.Tensor:
    """Varlen paged causal attention with Triton (see the module docstring for the contract)."""
    tag = _check_prefill(q, k_cache, v_cache, block_tables, cu_q, context_lens, k_scale, v_scale, kv_format)
    _check_launch("paged_prefill_attention", q)
    T, H, D = q.shape
    _, block_size, KV, _ = k_cache.shape
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("q and the caches need a contiguous head dimension (and the caches one layout)")
    k_codes, v_codes, k_scales, v_scales, scale_strides = _kernel_cache(k_cache, v_cache, k_scale, v_scale, tag)
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    S = context_lens.shape[0]
    if T == 0 or S == 0 or max_query_len <= 0:
        return out
    _paged_prefill_kernel[(triton.cdiv(max_query_len, block_m), S, H)](
        q,
        k_codes,
        v_codes,
        k_scales,
        v_scales,
        block_tables,
        cu_q,
        context_lens,
        out,
        float(scale) * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        *scale_strides,
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        VSG=_group(kv_format, D, value=True),
        GROUP=H // KV,
        D=D,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FMT=tag,
        num_warps=4,
    )
    return out


def _kernel_cache(k_cache, v_cache, k_scale, v_scale, tag: int):
    """What the kernels take for a checked cache: codes (fp8 ones as their bytes), the scales
    (for a float cache, the caches stand in: never read) and the key then value scales' first
    three strides."""
    if not tag:
        return k_cache, v_cache, k_cache, v_cache, (0,) * 6
    if k_cache.dtype == torch.float8_e4m3fn:  # decoded from its bits in the kernel, on any GPU
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    return k_cache, v_cache, k_scale, v_scale, (*k_scale.stride()[:3], *v_scale.stride()[:3])


def _kernels_interpreted() -> bool:
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return TRITON_AVAILABLE and not isinstance(_paged_decode_partial_kernel, triton.runtime.JITFunction)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    partition_size: int = 512,
    max_splits: int = 16,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    kv_format: str | None = None,
) -> torch.Tensor:
    """Paged decode attention with Triton (see the module docstring for the contract)."""
    tag = _check_inputs(q, k_cache, v_cache, block_tables, context_lens, partition_size, k_scale, v_scale, kv_format)
    if not isinstance(max_splits, int) or max_splits < 1:
        raise ValueError(f"max_splits must be a positive integer, got {max_splits!r}")
    _check_launch("paged_decode_attention", q)
    B, H, D = q.shape
    _, block_size, KV, _ = k_cache.shape

    max_blocks = block_tables.shape[1]
    max_ctx = max_blocks * block_size
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    if max_ctx == 0:
        return out.zero_()

    splits = min(math.ceil(max_ctx / partition_size), max_splits)
    group = H // KV
    use_dot = group > 1
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else 1
    tile = min(_MAX_TILE, partition_size)

    m_buf = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    l_buf = torch.empty_like(m_buf)
    acc_buf = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    k_codes, v_codes, k_scales, v_scales, scale_strides = _kernel_cache(k_cache, v_cache, k_scale, v_scale, tag)

    _paged_decode_partial_kernel[(B, KV, splits)](
        q,
        k_codes,
        v_codes,
        k_scales,
        v_scales,
        block_tables,
        context_lens,
        m_buf,
        l_buf,
        acc_buf,
        float(scale) * _LOG2E,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *scale_strides,
        *block_tables.stride(),
        max_ctx,
        VSG=_group(kv_format, D, value=True),
        H=H,
        SPLITS=splits,
        GROUP=group,
        GROUP_PAD=group_pad,
        D=D,
        BLOCK_SIZE=block_size,
        PARTITION=partition_size,
        TILE=tile,
        USE_DOT=use_dot,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        FMT=tag,
        num_warps=4,
    )
    _paged_decode_reduce_kernel[(B, H)](
        m_buf,
        l_buf,
        acc_buf,
        context_lens,
        out,
        *out.stride(),
        max_ctx,
        H=H,
        SPLITS=splits,
        D=D,
        PARTS_PAD=triton.next_power_of_2(splits),
        PARTITION=partition_size,
        num_warps=4,
    )
    return out
