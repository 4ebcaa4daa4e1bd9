"""The paged KV cache and attention over it: :class:`PagedKVCache`, :class:`AttentionMetadata`.

Contract: the cache holds, per layer, keys and values of shape (num_blocks + 1, block_size,
kv_heads, head_dim); the extra last block is a scratch block that padded rows of a CUDA-graph
batch write into. A forward over a flattened batch (input ids of shape (1, total tokens)) sets
``cache.metadata`` and passes the cache to the model; for every layer :meth:`PagedKVCache.attend`
writes the new keys/values at ``metadata.slot_mapping`` and returns, for each sequence's new
queries, causal attention over that sequence's cached tokens plus its new ones.

* On CPU nothing is gathered or masked, whatever the order of the blocks. Decode rows (one new
  token) go, all of the step's together, to the native paged kernel
  (:mod:`minicpm.engine.cpu_kernels`: one call per layer, blocks read through the block table
  in place), so a decode row's result does not depend on what else the step holds. Prefill
  chunks on a CPU with AVX-512 (AVX512-BF16 for bfloat16) go to the native prefill kernel (one
  call per chunk per layer, blocks read through the table: 1.25x torch's flash kernel in float32,
  2x in bfloat16 on the dot-product instruction). Other prefill chunks (and decode rows where the
  kernel cannot be built) attend to their own blocks read in place, one view per run of
  consecutive block ids (the block manager keeps a sequence's blocks consecutive where it can),
  runs merged by log-sum-exp.
* On GPU with Triton (:mod:`minicpm.engine.triton_attention`) every step reads the blocks in
  place too: its leading decode rows (the scheduler puts them first) go to the paged decode
  kernel, the rest (prefill chunks, with or without a cached past) to the varlen paged prefill
  kernel, one launch each per layer; a decode-only step is the decode kernel alone (and can
  replay a CUDA graph).
* On GPU without Triton, decode-only batches gather the blocks (a view when a sequence's blocks
  are consecutive) for one masked ``scaled_dot_product_attention``; other batches go per
  sequence, ``scaled_dot_product_attention`` with a bottom-right causal bias over the gathered
  context; a chunk with no cached past attends to its own keys with no gather. A chunk with a
  past runs as two kernels merged by log-sum-exp (:func:`split_causal_attention`): on CPU
  always; on CUDA when a start-up probe finds a kernel (cuDNN first) that agrees with the plain
  path, which is kept as the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import MiniCPMConfig
from ..model import causal_attention
from .cpu_kernels import advise_huge_pages, native_kernels, paged_attention, paged_prefill, prefill_available


def triton_available() -> bool:
    """Whether the Triton kernels can run (imported on first need: 0.2 s of start-up otherwise)."""
    try:
        from .triton_attention import TRITON_AVAILABLE
    except ImportError:  # pragma: no cover - the module guards its own import of triton
        return False
    return TRITON_AVAILABLE


def paged_decode_attention(*args: object, **kwargs: object) -> Tensor:
    """:func:`minicpm.engine.triton_attention.paged_decode_attention`, imported on first use."""
    from .triton_attention import paged_decode_attention as kernel

    return kernel(*args, **kwargs)


def paged_prefill_attention(*args: object, **kwargs: object) -> Tensor:
    """:func:`minicpm.engine.triton_attention.paged_prefill_attention`, imported on first use."""
    from .triton_attention import paged_prefill_attention as kernel

    return kernel(*args, **kwargs)


log = logging.getLogger("minicpm.engine")

LseAttention = Callable[[Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor]]
"""(q, k, v, is_causal) -> (output, float32 log-sum-exp of the scores, shape q.shape[:-1]); no GQA."""


def cpu_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal)[:2]
    return out, lse.reshape(q.shape[:-1])


def cudnn_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False)[:2]
    return out, lse.reshape(q.shape[:-1])


def flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False)[:2]
    return out, lse.reshape(q.shape[:-1])


def query_rows(q: Tensor) -> Tensor:
    """``q`` (1, heads, tokens, head_dim) as (tokens, heads, head_dim) with each token's heads
    contiguous, as the native kernels read it (a view where it already is)."""
    rows = q[0].transpose(0, 1)
    if rows.stride(2) != 1 or rows.stride(1) != rows.shape[2]:
        rows = rows.contiguous()
    return rows


def merge_by_lse(parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """Softmax attention over the union of disjoint key sets, from each set's (output, lse)."""
    if len(parts) == 1:
        return parts[0][0]
    lse = parts[0][1]
    for _, other in parts[1:]:
        lse = torch.logaddexp(lse, other)
    total = sum(out.float() * torch.exp(part_lse - lse).unsqueeze(-1) for out, part_lse in parts)
    return total.to(dtype)


def past_attention(attend: LseAttention, q: Tensor, pasts: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """(output, lse) of ``q`` (b, heads, t, d) over each (k, v) (b, kv_heads, s, d) of ``pasts``,
    unmasked. GQA: the queries of one kv head are stacked along the sequence (no copy of the keys)."""
    b, heads, t, d = q.shape
    kv_heads = pasts[0][0].shape[1]
    groups = heads // kv_heads
    stacked = q.reshape(b, kv_heads, groups * t, d)  # query head i uses kv head i // groups
    parts = []
    for k, v in pasts:
        out, lse = attend(stacked, k, v, False)
        parts.append((out.reshape(b, heads, t, d), lse.reshape(b, heads, t)))
    return parts


def split_causal_attention(
    attend: LseAttention, q: Tensor, k_past: Tensor, v_past: Tensor, k_new: Tensor, v_new: Tensor
) -> Tensor:
    """Causal attention of a chunk's queries over (cached past + its own keys) as two kernels: the
    past unmasked, the chunk with a plain (top-left) causal mask, merged by their log-sum-exps.
    Both kernels skip what a bottom-right mask would hide, which the masked kernels do not (on CPU
    about 1.6x faster for a late chunk), and on GPU the past can go to cuDNN, which takes no such
    mask. The past may be several segments (``k_past``/``v_past`` lists: runs of paged blocks read in
    place). GQA: the queries of one kv head are stacked along the sequence for the past (no copy of
    the past keys), and the chunk's own few keys are repeated per query head."""
    pasts = list(zip(k_past, v_past, strict=True)) if isinstance(k_past, list) else [(k_past, v_past)]
    parts = past_attention(attend, q, pasts)
    groups = q.shape[1] // k_new.shape[1]
    if groups > 1:
        k_new, v_new = k_new.repeat_interleave(groups, dim=1), v_new.repeat_interleave(groups, dim=1)
    parts.append(attend(q, k_new, v_new, True))
    return merge_by_lse(parts, q.dtype)


def probe_lse_attention(
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    candidates: tuple[LseAttention, ...] = (cudnn_attention_with_lse, flash_attention_with_lse),
) -> LseAttention | None:
    """The first candidate (cuDNN, then flash) whose split attention matches the plain path on a
    random chunk laid out like the cache's; None when none runs or agrees (the plain path is used)."""
    gen = torch.Generator(device=device).manual_seed(0)
    past, new = 200, 72

    def cached(n: int, h: int) -> Tensor:  # (1, h, n, d) strided like a view of the paged cache
        return torch.randn(n, h, head_dim, generator=gen, device=device, dtype=dtype).transpose(0, 1)[None]

    q, k, v = cached(new, heads), cached(past + new, kv_heads), cached(past + new, kv_heads)
    expected = causal_attention(q, k, v, past=past).float()
    for attend in candidates:
        try:
            got = split_causal_attention(attend, q, k[:, :, :past], v[:, :, :past], k[:, :, past:], v[:, :, past:])
        except Exception:  # an op this build or card lacks
            continue
        if torch.allclose(got.float(), expected, atol=2e-2, rtol=2e-2):
            return attend
    return None


def agrees_with_plain(out: Tensor, q: Tensor, kp: Tensor, vp: Tensor, k: Tensor, v: Tensor, rows: int = 16) -> bool:
    """Whether ``out`` (a chunk's attention over past + itself) matches the plain bottom-right causal
    path on the chunk's first ``rows`` queries (the reference costs those rows only)."""
    r = min(rows, q.shape[2])
    keys, values = torch.cat((kp, k[:, :, :r]), dim=2), torch.cat((vp, v[:, :, :r]), dim=2)
    expected = causal_attention(q[:, :, :r], keys, values, past=kp.shape[2]).float()
    return torch.allclose(out[:, :, :r].float(), expected, atol=2e-2, rtol=2e-2)


@dataclass
class AttentionMetadata:
    """Where one forward's tokens go in the cache and what each sequence attends to.

    Device tensors: ``slot_mapping`` (tokens,), ``block_tables`` (seqs, blocks) int32 and
    ``context_lens`` (seqs,) int32, which a CUDA graph replays from static buffers. Host lists
    (``query_lens``, ``context_lens_host``, ``seq_blocks``) drive the eager paths; they are
    ``None`` inside a captured decode graph. ``decode_mask`` (seqs, 1, 1, keys) masks the padding of
    the batched gather path (None when every sequence has the same length).
    """

    slot_mapping: Tensor
    block_tables: Tensor
    context_lens: Tensor
    decode_only: bool
    query_lens: list[int] | None = None
    context_lens_host: list[int] | None = None
    seq_blocks: list[Tensor | slice] | None = None
    decode_blocks: Tensor | slice | None = None
    decode_mask: Tensor | None = None
    # CPU: per sequence, (first slot, tokens) of each run of consecutive blocks holding its context
    seq_runs: list[list[tuple[int, int]]] | None = None
    # CPU native kernel: the decode rows' token indices (host), the row of ``block_tables`` each
    # reads and its context length (int32 tensors); None when the step has no decode row
    decode_rows: list[int] | None = None
    decode_seqs: Tensor | None = None
    decode_lens: Tensor | None = None
    # Triton steps with prefill rows: the leading 1-token sequences (decode kernel) and, for the
    # rest, row offsets (int32, from 0) and the longest query (varlen prefill kernel)
    leading_decodes: int = 0
    cu_q: Tensor | None = None
    max_query_len: int = 0


def decode_mask(md: AttentionMetadata, block_size: int) -> Tensor | None:
    """(seqs, 1, 1, keys) mask of the batched gather path's real keys (each row's context length
    out of the table width); None when every sequence has the same length (nothing to mask)."""
    if len(set(md.context_lens_host)) == 1:
        return None
    keys = torch.arange(md.block_tables.shape[1] * block_size, device=md.block_tables.device)
    return (keys[None, :] < md.context_lens[:, None])[:, None, None, :]


HUGE_PAGE_LAYER_BYTES = 64 * 1024**2


class PagedKVCache:
    def __init__(
        self,
        config: MiniCPMConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        use_triton: bool | None = None,
    ) -> None:
        shape = (config.num_hidden_layers, num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        # uninitialized: no path reads a slot before it is written, except the padded gather of
        # batched decode, which zeroes what it masks (so a large CPU budget costs no memory until used)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        # on CPU, a cache of at least 64 MiB a layer on huge pages (decode attention reads scattered
        # blocks: fewer TLB misses); a smaller one stays on 4 KiB pages, where touching one block
        # of each layer would commit 2 MiB a layer
        if self.k[0].nbytes >= HUGE_PAGE_LAYER_BYTES:
            for cache in (self.k, self.v):
                advise_huge_pages(cache)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_slot = num_blocks * block_size
        self.scale = config.head_dim**-0.5
        device = torch.device(device)
        if use_triton is None:
            use_triton = device.type == "cuda" and triton_available()
        self.use_triton = use_triton
        # a chunk with a cached past as two kernels merged by log-sum-exp (split_causal_attention):
        # on CPU the flash kernel; on CUDA the first kernel a probe finds agreeing with the plain path,
        # then per shape class (see _lse_kernels) the first that runs and agrees on its first chunk
        self.lse_attention: LseAttention | None = None
        self.lse_candidates: tuple[LseAttention, ...] = ()
        self.lse_by_class: dict[tuple[int, int], LseAttention | None] = {}
        if device.type == "cpu":
            self.lse_attention = cpu_attention_with_lse
        elif device.type == "cuda":
            self.lse_attention = probe_lse_attention(
                device, dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim
            )
            self.lse_candidates = (cudnn_attention_with_lse, flash_attention_with_lse)
        # CPU decode rows: the native paged kernel, where it builds (else the per-run torch path)
        self.native = None
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            self.native = native_kernels()
        # CPU prefill chunks: the native kernel, where the CPU has AVX-512 (AVX512-BF16 for bfloat16)
        self.native_prefill = self.native if prefill_available(self.native, dtype, config.head_dim) else None
        self.metadata: AttentionMetadata | None = None
        # called before each layer's attention (the CPU engine's thread governor: a long prefill
        # step follows the machine's load layer by layer, not only between steps)
        self.on_layer: Callable[[], None] | None = None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def _blocks(cache: Tensor, blocks: Tensor | slice) -> Tensor:
        """(tokens, kv_heads, head_dim) of the given blocks: a view for a slice, else one gather."""
        kv = cache[blocks] if isinstance(blocks, slice) else cache.index_select(0, blocks.view(-1))
        return kv.view(-1, kv.shape[-2], kv.shape[-1])

    def _context(self, cache: Tensor, blocks: Tensor | slice, length: int) -> Tensor:
        """(kv_heads, length, head_dim) view or gather of one sequence's cached keys or values."""
        return self._blocks(cache, blocks)[:length].transpose(0, 1)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        md = self.metadata
        if md is None:
            raise RuntimeError("PagedKVCache.attend called without metadata")
        if self.on_layer is not None:
            self.on_layer()
        kc, vc = self.k[layer], self.v[layer]
        kv_heads, d = kc.shape[-2], kc.shape[-1]
        kc.view(-1, kv_heads, d).index_copy_(0, md.slot_mapping, k[0].transpose(0, 1))
        vc.view(-1, kv_heads, d).index_copy_(0, md.slot_mapping, v[0].transpose(0, 1))
        if md.seq_runs is not None:
            kc, vc = kc.view(-1, kv_heads, d), vc.view(-1, kv_heads, d)
            if self.native is not None and md.decode_rows:
                return self._attend_native(kc, vc, q, k, v, md)
            return self._attend_in_place(kc, vc, q, k, v, md)
        if self.use_triton and (md.decode_only or md.cu_q is not None):
            try:
                return self._decode(kc, vc, q, md) if md.decode_only else self._triton_step(kc, vc, q, md)
            except Exception as exc:  # a kernel failing mid-serving: the torch path, from now on
                if md.context_lens_host is None:  # inside a captured graph: nothing to fall back to here
                    raise
                self._drop_triton(exc, md)
        if md.decode_only:
            return self._decode(kc, vc, q, md)
        outs, start = [], 0
        for i, n in enumerate(md.query_lens):
            qi = q[:, :, start : start + n]
            ctx = md.context_lens_host[i]
            ki, vi = k[:, :, start : start + n], v[:, :, start : start + n]
            if ctx == n:
                out = causal_attention(qi, ki, vi)
            else:
                out = self._split(kc, vc, qi, ki, vi, md, i) if self.lse_attention is not None and n > 1 else None
                if out is None:  # the plain bottom-right causal path
                    kc_i = self._context(kc, md.seq_blocks[i], ctx)[None]
                    vc_i = self._context(vc, md.seq_blocks[i], ctx)[None]
                    out = causal_attention(qi, kc_i, vc_i, past=ctx - n)
            outs.append(out)
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _attend_native(self, kc: Tensor, vc: Tensor, q: Tensor, k: Tensor, v: Tensor, md: AttentionMetadata) -> Tensor:
        """The step's decode rows in one native kernel call; its prefill chunks (if any) by
        :meth:`_attend_in_place`, written around them. Returns (1, heads, tokens, head_dim)."""
        rows = query_rows(q)
        tokens = rows.shape[0]
        every = len(md.decode_rows) == tokens
        queries = rows if every else rows[torch.tensor(md.decode_rows)]
        decoded = paged_attention(
            queries, kc, vc, md.block_tables, md.decode_seqs, md.decode_lens, self.block_size, self.scale, self.native
        )
        if every:
            return decoded.transpose(0, 1)[None]
        out = torch.empty_like(rows, memory_format=torch.contiguous_format)
        out[md.decode_rows] = decoded
        start = 0
        for i, n in enumerate(md.query_lens):
            if n > 1:
                sub = AttentionMetadata(
                    md.slot_mapping, md.block_tables[i : i + 1], md.context_lens, False, [n], [md.context_lens_host[i]]
                )
                sub.seq_runs = [md.seq_runs[i]]
                part = self._attend_in_place(
                    kc, vc, q[:, :, start : start + n], k[:, :, start : start + n], v[:, :, start : start + n], sub
                )
                out[start : start + n] = part[0].transpose(0, 1)
            start += n
        return out.transpose(0, 1)[None]

    def _attend_in_place(
        self, kc: Tensor, vc: Tensor, q: Tensor, k: Tensor, v: Tensor, md: AttentionMetadata
    ) -> Tensor:
        """Every sequence of the step, decode rows and prefill chunks alike, attends to its own
        blocks read in place: each run of consecutive blocks is a view of the cache (no gather, no
        mask), runs are merged by log-sum-exp. ``kc``/``vc``: (slots, kv_heads, head_dim)."""
        heads, d = q.shape[1], q.shape[3]
        attend = self.lse_attention or cpu_attention_with_lse
        kv_heads = kc.shape[1]
        groups = heads // kv_heads
        outs, start = [], 0
        for i, n in enumerate(md.query_lens):
            qi = q[:, :, start : start + n]
            ctx = md.context_lens_host[i]
            past = ctx - n
            if n > 1 and self.native_prefill is not None:  # one native call
                table = md.block_tables[i]
                out = paged_prefill(
                    query_rows(qi), kc, vc, table, past, self.block_size, self.scale, self.native_prefill
                )
                out = out.transpose(0, 1)[None]
            elif n > 1 and past == 0:  # a first chunk: its own keys only
                out = causal_attention(qi, k[:, :, start : start + n], v[:, :, start : start + n])
            else:
                limit = ctx if n == 1 else past  # a decode row's own key is in the cache already
                segments, seen = [], 0
                for slot, tokens in md.seq_runs[i]:
                    tokens = min(tokens, limit - seen)
                    if tokens <= 0:
                        break
                    end = slot + tokens  # (1, kv_heads, tokens, head_dim) views of the cache
                    segments.append((kc[slot:end].transpose(0, 1)[None], vc[slot:end].transpose(0, 1)[None]))
                    seen += tokens
                if n == 1 and len(segments) == 1:  # the common decode case: one plain kernel call
                    kk, vv = segments[0]
                    out = F.scaled_dot_product_attention(qi.reshape(1, kv_heads, groups, d), kk, vv)
                    out = out.reshape(1, heads, 1, d)
                elif n == 1:
                    out = merge_by_lse(past_attention(attend, qi, segments), q.dtype)
                else:
                    ks, vs = [kk for kk, _ in segments], [vv for _, vv in segments]
                    out = split_causal_attention(
                        attend, qi, ks, vs, k[:, :, start : start + n], v[:, :, start : start + n]
                    )
            outs.append(out)
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _split(
        self, kc: Tensor, vc: Tensor, q: Tensor, k: Tensor, v: Tensor, md: AttentionMetadata, i: int
    ) -> Tensor | None:
        """Sequence ``i``'s chunk by :func:`split_causal_attention`; None (the plain path) if no
        kernel serves its shape class (:meth:`_lse_kernels`) or, without classes, if the kernel fails
        (the plain path from then on)."""
        past = md.context_lens_host[i] - q.shape[2]
        kp = self._context(kc, md.seq_blocks[i], past)[None]
        vp = self._context(vc, md.seq_blocks[i], past)[None]
        if self.lse_candidates:
            return self._lse_kernels(q, kp, vp, k, v)
        try:
            return split_causal_attention(self.lse_attention, q, kp, vp, k, v)
        except Exception as exc:
            log.warning("the split prefill kernel failed (%s: %s); using the plain path", type(exc).__name__, exc)
            self.lse_attention = None
            return None

    def _lse_kernels(self, q: Tensor, kp: Tensor, vp: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """The chunk over its past by the kernel chosen for its shape class: (past, chunk) lengths by
        powers of two. A class's first chunk tries the candidates in order (cuDNN, then flash) and
        keeps the first that runs and whose first rows agree with the plain path's on this very
        input; a kernel that fails later drops out of its class. None: the plain path serves it."""
        past, new = kp.shape[2], q.shape[2]
        key = (past.bit_length(), new.bit_length())
        if key in self.lse_by_class and self.lse_by_class[key] is None:
            return None
        chosen = self.lse_by_class.get(key)  # verified on its class's first chunk
        order = (
            self.lse_candidates if chosen is None else (chosen, *(c for c in self.lse_candidates if c is not chosen))
        )
        for attend in order:
            try:
                out = split_causal_attention(attend, q, kp, vp, k, v)
            except Exception as exc:  # this build or card lacks it for this shape: the next one
                name = getattr(attend, "__name__", repr(attend))
                log.warning(
                    "%s failed on a %d-token chunk over %d cached tokens (%s: %s)",
                    name,
                    new,
                    past,
                    type(exc).__name__,
                    exc,
                )
                continue
            if attend is chosen or agrees_with_plain(out, q, kp, vp, k, v):
                self.lse_by_class[key] = attend
                return out
        self.lse_by_class[key] = None
        return None

    def _drop_triton(self, exc: Exception, md: AttentionMetadata) -> None:
        """Leave the Triton kernels for good and give this step what the torch paths read."""
        log.warning("a Triton attention kernel failed (%s: %s); using the torch path", type(exc).__name__, exc)
        self.use_triton = False
        bs = self.block_size
        md.cu_q = None
        if md.decode_only:
            md.decode_blocks = md.block_tables.long()
            md.decode_mask = decode_mask(md, bs)
        else:
            md.seq_blocks = [md.block_tables[i, : -(-n // bs)].long() for i, n in enumerate(md.context_lens_host)]

    def _triton_step(self, kc: Tensor, vc: Tensor, q: Tensor, md: AttentionMetadata) -> Tensor:
        """A step with prefill rows, in place: its leading decode rows through the paged decode
        kernel, every other row through the varlen paged prefill kernel."""
        rows = q[0].transpose(0, 1)  # (tokens, heads, head_dim)
        n = md.leading_decodes
        out = torch.empty(rows.shape, dtype=q.dtype, device=q.device)
        if n:
            out[:n] = paged_decode_attention(rows[:n], kc, vc, md.block_tables[:n], md.context_lens[:n], self.scale)
        out[n:] = paged_prefill_attention(
            rows[n:], kc, vc, md.block_tables[n:], md.cu_q, md.context_lens[n:], self.scale, md.max_query_len
        )
        return out.transpose(0, 1)[None]

    def _decode(self, kc: Tensor, vc: Tensor, q: Tensor, md: AttentionMetadata) -> Tensor:
        qb = q[0].transpose(0, 1)  # (seqs, heads, head_dim)
        if self.use_triton:
            out = paged_decode_attention(
                qb.contiguous(), kc, vc, md.block_tables, md.context_lens, self.scale
            )  # (seqs, heads, head_dim)
            return out.transpose(0, 1)[None]
        b, kv_heads, d = qb.shape[0], kc.shape[-2], kc.shape[-1]
        keys = self._blocks(kc, md.decode_blocks).view(b, -1, kv_heads, d).transpose(1, 2)
        values = self._blocks(vc, md.decode_blocks).view(b, -1, kv_heads, d).transpose(1, 2)
        if md.decode_mask is None:
            length = md.context_lens_host[0]
            keys, values = keys[:, :, :length], values[:, :, :length]
        else:  # padding may hold never-written memory: 0 * NaN would leak through the softmax
            keys = keys.masked_fill(~md.decode_mask.transpose(2, 3), 0)
            values = values.masked_fill(~md.decode_mask.transpose(2, 3), 0)
        out = F.scaled_dot_product_attention(
            qb[:, :, None], keys, values, attn_mask=md.decode_mask, enable_gqa=qb.shape[1] != kv_heads
        )  # (seqs, heads, 1, head_dim)
        return out[:, :, 0].transpose(0, 1)[None]
