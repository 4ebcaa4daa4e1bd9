"""The ``torch`` attention backend: plain PyTorch over gathered context, on any device.

Contract: on CPU this is the reference every other backend is tested against: a decode-only step
gathers each sequence's blocks (a view when they are consecutive) for one masked
``scaled_dot_product_attention``; any other step goes sequence by sequence, a chunk with no cached
past over its own keys, a chunk with a past by ``scaled_dot_product_attention`` with a bottom-right
causal mask over the gathered context. On CUDA (the path when Triton is missing, and the fallback
of the Triton backend) a chunk with a past runs as two kernels merged by log-sum-exp
(:func:`~minicpm.engine.attention.lse.split_causal_attention`), with the kernel chosen per shape
class: (past, chunk) lengths by powers of two, the first of cuDNN and flash that runs and agrees
with the plain path on its class's first chunk; a kernel that fails later leaves its class, and
every such failure is counted in ``failures`` (the plain path serves what no kernel does).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ...model import causal_attention
from .base import AttentionBackend, AttentionMetadata
from .lse import (
    LseAttention,
    agrees_with_plain,
    cudnn_attention_with_lse,
    flash_attention_with_lse,
    split_causal_attention,
)

if TYPE_CHECKING:
    from .cache import PagedKVCache

log = logging.getLogger("minicpm.engine")


@dataclass
class TorchMetadata(AttentionMetadata):
    """``seq_blocks``: each sequence's blocks (a slice when consecutive, else a device index
    tensor); a decode-only step's ``decode_blocks`` (the same for the whole batch) and
    ``decode_mask`` (seqs, 1, 1, keys) of its real keys (None when all lengths are equal)."""

    seq_blocks: list[Tensor | slice] | None = None
    decode_blocks: Tensor | slice | None = None
    decode_mask: Tensor | None = None


def _is_run(blocks: list[int]) -> bool:
    return blocks[-1] - blocks[0] == len(blocks) - 1 and all(b + 1 == c for b, c in itertools.pairwise(blocks))


def _context(cache: PagedKVCache, layer: int, blocks: Tensor | slice, length: int) -> tuple[Tensor, Tensor]:
    """(1, kv_heads, length, head_dim) keys and values of one sequence: views of its blocks when
    consecutive, else gathered (dequantized for a quantized cache)."""
    k, v = cache.read_blocks(layer, blocks)
    return k[:length].transpose(0, 1)[None], v[:length].transpose(0, 1)[None]


def probe_lse_attention(
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    candidates: tuple[LseAttention, ...] = (cudnn_attention_with_lse, flash_attention_with_lse),
) -> LseAttention | None:
    """The first candidate (cuDNN, then flash) whose split attention matches the plain path on a
    random chunk laid out like the cache's; None when none runs or agrees (the plain path is used).
    A candidate that raises is one this build or card lacks: logged and passed over."""
    gen = torch.Generator(device=device).manual_seed(0)
    past, new = 200, 72

    def cached(n: int, h: int) -> Tensor:  # (1, h, n, d) strided like a view of the paged cache
        return torch.randn(n, h, head_dim, generator=gen, device=device, dtype=dtype).transpose(0, 1)[None]

    q, k, v = cached(new, heads), cached(past + new, kv_heads), cached(past + new, kv_heads)
    expected = causal_attention(q, k, v, past=past).float()
    for attend in candidates:
        try:
            got = split_causal_attention(attend, q, k[:, :, :past], v[:, :, :past], k[:, :, past:], v[:, :, past:])
        except (RuntimeError, NotImplementedError, AttributeError) as exc:  # an op this build or card lacks
            log.info("%s does not run here (%s: %s)", getattr(attend, "__name__", attend), type(exc).__name__, exc)
            continue
        if torch.allclose(got.float(), expected, atol=2e-2, rtol=2e-2):
            return attend
    return None


class TorchBackend(AttentionBackend):
    """See the module docstring. ``lse_candidates``: the split kernels to try per shape class
    (empty: every chunk with a past takes the plain masked path)."""

    name = "torch"

    def __init__(self, lse_candidates: tuple[LseAttention, ...] = ()) -> None:
        self.lse_candidates = lse_candidates
        self.lse_by_class: dict[tuple[int, int], LseAttention | None] = {}
        self.failures: Counter[str] = Counter()

    @classmethod
    def for_device(
        cls, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
    ) -> TorchBackend:
        """The plain path on CPU; on CUDA the split kernels, where a start-up probe finds one agreeing."""
        if device.type != "cuda" or probe_lse_attention(device, dtype, heads, kv_heads, head_dim) is None:
            return cls()
        return cls((cudnn_attention_with_lse, flash_attention_with_lse))

    def describe(self) -> str:
        if not self.lse_candidates:
            return "torch (gathered context, masked scaled_dot_product_attention)"
        names = ", ".join(getattr(c, "__name__", repr(c)) for c in self.lse_candidates)
        return f"torch (gathered context; chunks with a past split and merged by log-sum-exp: {names})"

    def prepare(self, cache: PagedKVCache, md: AttentionMetadata) -> TorchMetadata:
        out = TorchMetadata(**md.common())
        device = md.block_tables.device
        blocks = [slice(t[0], t[-1] + 1) if _is_run(t) else t for t in md.tables]
        if md.decode_only:
            one_run = len(blocks) == 1 and isinstance(blocks[0], slice)
            out.decode_blocks = blocks[0] if one_run else md.block_tables.long()
            if len(set(md.context_lens_host)) > 1:  # the real keys of each row, out of the table width
                keys = torch.arange(md.block_tables.shape[1] * cache.block_size, device=device)
                out.decode_mask = (keys[None, :] < md.context_lens[:, None])[:, None, None, :]
        else:
            out.seq_blocks = [b if isinstance(b, slice) else torch.tensor(b, device=device) for b in blocks]
        return out

    def attend(self, cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, md: TorchMetadata) -> Tensor:
        if md.decode_only:
            return self._decode(cache, layer, q, md)
        outs, start = [], 0
        for i, n in enumerate(md.query_lens):
            qi = q[:, :, start : start + n]
            ctx = md.context_lens_host[i]
            ki, vi = k[:, :, start : start + n], v[:, :, start : start + n]
            if ctx == n:
                out = causal_attention(qi, ki, vi)
            else:
                out = None
                if self.lse_candidates and n > 1:
                    kp, vp = _context(cache, layer, md.seq_blocks[i], ctx - n)
                    out = self._split(qi, kp, vp, ki, vi)
                if out is None:  # the plain bottom-right causal path over the cached context
                    keys, values = _context(cache, layer, md.seq_blocks[i], ctx)
                    out = causal_attention(qi, keys, values, past=ctx - n)
            outs.append(out)
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _split(self, q: Tensor, kp: Tensor, vp: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """The chunk over its past by the kernel chosen for its shape class (see the module
        docstring); None: the plain path serves it."""
        past, new = kp.shape[2], q.shape[2]
        key = (past.bit_length(), new.bit_length())
        if key in self.lse_by_class and self.lse_by_class[key] is None:
            return None
        chosen = self.lse_by_class.get(key)  # verified on its class's first chunk
        order = (
            self.lse_candidates if chosen is None else (chosen, *(c for c in self.lse_candidates if c is not chosen))
        )
        for attend in order:
            name = getattr(attend, "__name__", repr(attend))
            try:
                out = split_causal_attention(attend, q, kp, vp, k, v)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, NotImplementedError, AttributeError) as exc:  # not here, or not for this shape
                self.failures[name] += 1
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

    def _decode(self, cache: PagedKVCache, layer: int, q: Tensor, md: TorchMetadata) -> Tensor:
        qb = q[0].transpose(0, 1)  # (seqs, heads, head_dim)
        b, kv_heads, d = qb.shape[0], cache.kv_heads, cache.head_dim
        keys, values = cache.read_blocks(layer, md.decode_blocks)
        keys = keys.view(b, -1, kv_heads, d).transpose(1, 2)
        values = values.view(b, -1, kv_heads, d).transpose(1, 2)
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
