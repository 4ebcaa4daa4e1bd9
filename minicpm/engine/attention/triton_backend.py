"""The ``triton`` attention backend (CUDA; on CPU only in Triton's interpreter, for tests).

Contract: every step reads the blocks in place. A decode-only step is the paged decode kernel
alone (one launch per layer; it reads only device tensors, so it can be captured in a CUDA graph
and replayed). A step with prefill rows sends its leading decode rows (the scheduler puts them
first) to the paged decode kernel and every other row to the varlen paged prefill kernel, one
launch each per layer. The kernels are :mod:`minicpm.engine.triton_attention`; the fallback, when
one of them fails mid-serving and the engine is configured to fall back, is the ``torch`` backend.
Every cache format is served in place: a float cache as its values, a quantized one (int8, int4,
fp8) as its codes with the layer's scales beside them, dequantized by the kernels in registers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from .cache import PagedKVCache


def triton_available() -> bool:
    """Whether the Triton kernels can run (triton is imported on first need, not at start-up)."""
    try:
        from ..triton_attention import TRITON_AVAILABLE
    except ImportError:  # pragma: no cover - the module guards its own import of triton
        return False
    return TRITON_AVAILABLE


@dataclass
class TritonMetadata(AttentionMetadata):
    """A step with prefill rows: row offsets (int32, from 0) of the sequences after the leading
    decodes, and the longest of their queries (the varlen prefill kernel's grid)."""

    cu_q: Tensor | None = None
    max_query_len: int = 0


class TritonBackend(AttentionBackend):
    """See the module docstring."""

    name = "triton"
    graphs = True

    def __init__(self, fallback: AttentionBackend | None = None) -> None:
        from ..triton_attention import paged_decode_attention, paged_prefill_attention

        self.decode_kernel, self.prefill_kernel = paged_decode_attention, paged_prefill_attention
        self.fallback = fallback

    def describe(self) -> str:
        return "triton (paged decode and varlen prefill kernels, blocks read in place)"

    def prepare(self, cache: PagedKVCache, md: AttentionMetadata) -> TritonMetadata:
        out = TritonMetadata(**md.common())
        if not md.decode_only:
            rest = md.query_lens[md.leading_decodes :]
            cu = torch.tensor([0, *itertools.accumulate(rest)], dtype=torch.int32)
            if md.block_tables.is_cuda:
                cu = cu.pin_memory().to(md.block_tables.device, non_blocking=True)
            out.cu_q = cu
            out.max_query_len = max(rest)
        return out

    def attend(self, cache: PagedKVCache, layer: int, q: Tensor, k: Tensor, v: Tensor, md: TritonMetadata) -> Tensor:
        kc, vc = cache.k[layer], cache.v[layer]
        fmt = {"kv_format": cache.format.name}
        if cache.format.quantized:  # codes: the kernels dequantize them with the scales beside them
            fmt.update(k_scale=cache.k_scale[layer], v_scale=cache.v_scale[layer])
        rows = q[0].transpose(0, 1)  # (tokens, heads, head_dim)
        if md.decode_only:
            out = self.decode_kernel(rows.contiguous(), kc, vc, md.block_tables, md.context_lens, cache.scale, **fmt)
            return out.transpose(0, 1)[None]
        n = md.leading_decodes
        out = torch.empty(rows.shape, dtype=q.dtype, device=q.device)
        if n:
            out[:n] = self.decode_kernel(rows[:n], kc, vc, md.block_tables[:n], md.context_lens[:n], cache.scale, **fmt)
        out[n:] = self.prefill_kernel(
            rows[n:], kc, vc, md.block_tables[n:], md.cu_q, md.context_lens[n:], cache.scale, md.max_query_len, **fmt
        )
        return out.transpose(0, 1)[None]
