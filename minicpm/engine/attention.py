"""The paged KV cache and attention over it: :class:`PagedKVCache`, :class:`AttentionMetadata`.

Contract: the cache holds, per layer, keys and values of shape (num_blocks + 1, block_size,
kv_heads, head_dim); the extra last block is a scratch block that padded rows of a CUDA-graph
batch write into. A forward over a flattened batch (input ids of shape (1, total tokens)) sets
``cache.metadata`` and passes the cache to the model; for every layer :meth:`PagedKVCache.attend`
writes the new keys/values at ``metadata.slot_mapping`` and returns, for each sequence's new
queries, causal attention over that sequence's cached tokens plus its new ones.

* Decode-only batches (one new token per sequence): on CUDA with Triton, a paged kernel reads the
  blocks in place (:mod:`minicpm.engine.triton_attention`); otherwise the blocks are gathered
  (a view, no copy, when a sequence's blocks are consecutive) and one masked
  ``scaled_dot_product_attention`` call covers the batch.
* Other batches (prefill chunks, possibly with decodes): per sequence, ``scaled_dot_product_attention``
  with a bottom-right causal bias over the gathered context; a chunk with no cached past attends
  to its own keys with no gather. A chunk with a past runs as two kernels merged by log-sum-exp
  (:func:`split_causal_attention`): on CPU always; on CUDA when a start-up probe finds a kernel
  (cuDNN first) that agrees with the plain path, which is kept as the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import MiniCPMConfig
from ..model import causal_attention

try:
    from .triton_attention import TRITON_AVAILABLE, paged_decode_attention
except ImportError:  # pragma: no cover - the module guards its own import of triton
    TRITON_AVAILABLE = False
    paged_decode_attention = None


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


def split_causal_attention(
    attend: LseAttention, q: Tensor, k_past: Tensor, v_past: Tensor, k_new: Tensor, v_new: Tensor
) -> Tensor:
    """Causal attention of a chunk's queries over (cached past + its own keys) as two kernels: the
    past unmasked, the chunk with a plain (top-left) causal mask, merged by their log-sum-exps.
    Both kernels skip what a bottom-right mask would hide, which the masked kernels do not (on CPU
    about 1.6x faster for a late chunk), and on GPU the past can go to cuDNN, which takes no such
    mask. GQA: the queries of one kv head are stacked along the sequence for the past (no copy of
    the past keys), and the chunk's own few keys are repeated per query head."""
    b, heads, t, d = q.shape
    kv_heads = k_past.shape[1]
    groups = heads // kv_heads
    if groups > 1:
        stacked = q.reshape(b, kv_heads, groups * t, d)  # query head i uses kv head i // groups
        out_past, lse_past = attend(stacked, k_past, v_past, False)
        out_past, lse_past = out_past.reshape(b, heads, t, d), lse_past.reshape(b, heads, t)
        k_new, v_new = k_new.repeat_interleave(groups, dim=1), v_new.repeat_interleave(groups, dim=1)
    else:
        out_past, lse_past = attend(q, k_past, v_past, False)
    out_new, lse_new = attend(q, k_new, v_new, True)
    lse = torch.logaddexp(lse_past, lse_new)
    w_past = torch.exp(lse_past - lse).unsqueeze(-1)
    w_new = torch.exp(lse_new - lse).unsqueeze(-1)
    return (out_past.float() * w_past + out_new.float() * w_new).to(q.dtype)


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
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_slot = num_blocks * block_size
        self.scale = config.head_dim**-0.5
        device = torch.device(device)
        if use_triton is None:
            use_triton = device.type == "cuda" and TRITON_AVAILABLE
        self.use_triton = use_triton
        # a chunk with a cached past as two kernels merged by log-sum-exp (split_causal_attention):
        # on CPU the flash kernel; on CUDA the first kernel a probe finds agreeing with the plain path
        self.lse_attention: LseAttention | None = None
        if device.type == "cpu":
            self.lse_attention = cpu_attention_with_lse
        elif device.type == "cuda":
            self.lse_attention = probe_lse_attention(
                device, dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim
            )
        self.metadata: AttentionMetadata | None = None

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
        kc, vc = self.k[layer], self.v[layer]
        kv_heads, d = kc.shape[-2], kc.shape[-1]
        kc.view(-1, kv_heads, d).index_copy_(0, md.slot_mapping, k[0].transpose(0, 1))
        vc.view(-1, kv_heads, d).index_copy_(0, md.slot_mapping, v[0].transpose(0, 1))
        if md.decode_only:
            return self._decode(kc, vc, q, md)
        outs, start = [], 0
        for i, n in enumerate(md.query_lens):
            qi = q[:, :, start : start + n]
            ctx = md.context_lens_host[i]
            ki, vi = k[:, :, start : start + n], v[:, :, start : start + n]
            if ctx == n:
                out = causal_attention(qi, ki, vi)
            elif self.lse_attention is not None and n > 1:
                past = ctx - n
                kp = self._context(kc, md.seq_blocks[i], past)[None]
                vp = self._context(vc, md.seq_blocks[i], past)[None]
                out = split_causal_attention(self.lse_attention, qi, kp, vp, ki, vi)
            else:
                kc_i = self._context(kc, md.seq_blocks[i], ctx)[None]
                vc_i = self._context(vc, md.seq_blocks[i], ctx)[None]
                out = causal_attention(qi, kc_i, vc_i, past=ctx - n)
            outs.append(out)
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

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
