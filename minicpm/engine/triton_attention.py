"""Triton paged-attention decode kernel (flash-decoding, split-K), optional.

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

Implementation: kernel 1 runs on grid ``(B, KV, num_partitions)`` with
``num_partitions = cdiv(max_blocks * block_size, partition_size)``, computed from static
shapes only. Each program handles all ``H // KV`` query heads of its kv head (each K/V tile
is loaded once for the group) over one ``partition_size``-token slice of the sequence and
writes an unnormalised partial output plus its running max / sum (max = -inf, sum = 0
for partitions past ``context_len``). Kernel 2 (grid ``(B, H)``) merges the partials with
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

__all__ = ["TRITON_AVAILABLE", "paged_decode_attention", "paged_decode_attention_reference"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_TILE = 64  # tokens per inner tile (a tile may span several cache blocks)


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens, partition_size) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, D), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (num_blocks, block_size, KV, D), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    B, H, D = q.shape
    _, block_size, KV, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has D={D}, cache has D={Dk}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of {_SUPPORTED_DTYPES}, got {q.dtype}")
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


if TRITON_AVAILABLE:

    @triton.jit
    def _paged_decode_partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
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
        stride_btb,
        stride_btn,
        max_ctx,  # max_blocks * BLOCK_SIZE
        num_parts,
        H: tl.constexpr,
        GROUP: tl.constexpr,  # H // KV real query heads per program
        GROUP_PAD: tl.constexpr,  # padded row count (1, or >= 16 for tl.dot)
        D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        PARTITION: tl.constexpr,
        TILE: tl.constexpr,
        USE_DOT: tl.constexpr,  # GROUP > 1: tensor-core dot over the padded head group
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32 rounding)
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)

        ctx = tl.minimum(tl.load(ctx_ptr + b), max_ctx)
        part_start = part * PARTITION
        part_len = tl.minimum(tl.maximum(ctx - part_start, 0), PARTITION)
        num_tiles = tl.cdiv(part_len, TILE)  # 0 for partitions past the context: no cache reads

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
        for t in range(0, num_tiles):
            tok = part_start + t * TILE + offs_t
            tok_ok = tok < ctx
            # Physical block of each token; masked so padding table entries are never read.
            blk = tl.load(bt_ptr + b * stride_btb + (tok // BLOCK_SIZE) * stride_btn, mask=tok_ok, other=0)
            blk = blk.to(tl.int64)
            slot = tok % BLOCK_SIZE
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

        stat_off = (b * H + heads) * num_parts + part
        tl.store(m_ptr + stat_off, m_i, mask=row_ok)
        tl.store(l_ptr + stat_off, l_i, mask=row_ok)
        # Dead partitions only write the neutral (m=-inf, l=0) stats; the reducer skips their acc.
        acc_rows = tl.where(num_tiles > 0, GROUP, 0)
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
        num_parts,
        H: tl.constexpr,
        D: tl.constexpr,
        PARTS_PAD: tl.constexpr,
        PARTITION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.minimum(tl.load(ctx_ptr + b), max_ctx)
        num_live = tl.cdiv(tl.maximum(ctx, 0), PARTITION)

        base = (b * H + h) * num_parts
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
) -> torch.Tensor:
    """Paged decode attention with Triton (see the module docstring for the contract)."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("paged_decode_attention needs triton, which is not installed")
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, partition_size)
    B, H, D = q.shape
    _, block_size, KV, _ = k_cache.shape
    if not _is_pow2(D) or not 16 <= D <= 256:
        raise ValueError(f"head dim D must be a power of two in [16, 256], got {D}")
    if not q.is_cuda and not _kernels_interpreted():
        raise ValueError(f"paged_decode_attention needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")

    max_blocks = block_tables.shape[1]
    max_ctx = max_blocks * block_size
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0 or H == 0:
        return out
    if max_ctx == 0:
        return out.zero_()

    num_parts = math.ceil(max_ctx / partition_size)
    group = H // KV
    use_dot = group > 1
    group_pad = max(16, triton.next_power_of_2(group)) if use_dot else 1
    tile = min(_MAX_TILE, partition_size)

    m_buf = torch.empty(B, H, num_parts, dtype=torch.float32, device=q.device)
    l_buf = torch.empty_like(m_buf)
    acc_buf = torch.empty(B, H, num_parts, D, dtype=torch.float32, device=q.device)

    _paged_decode_partial_kernel[(B, KV, num_parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        m_buf,
        l_buf,
        acc_buf,
        float(scale) * _LOG2E,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_tables.stride(),
        max_ctx,
        num_parts,
        H=H,
        GROUP=group,
        GROUP_PAD=group_pad,
        D=D,
        BLOCK_SIZE=block_size,
        PARTITION=partition_size,
        TILE=tile,
        USE_DOT=use_dot,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
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
        num_parts,
        H=H,
        D=D,
        PARTS_PAD=triton.next_power_of_2(num_parts),
        PARTITION=partition_size,
        num_warps=4,
    )
    return out
