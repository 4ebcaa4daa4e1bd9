"""Attention as parts merged by their log-sum-exps: the building block of the paths that read a
sequence's context as several pieces (runs of blocks, or a cached past and a new chunk).

Contract: an :data:`LseAttention` kernel takes ``(q, k, v, is_causal)`` of shape (b, heads, t, d)
with as many query as key heads and returns (output, float32 log-sum-exp of the scores with shape
``q.shape[:-1]``). :func:`merge_by_lse` turns the parts of disjoint key sets into softmax attention
over their union, folding them in one at a time: a part is computed, added to a float32 running
sum and dropped before the next one is read, so a context read as many pieces (a quantized cache
dequantized a piece at a time) never has more than one piece and one part alive.
:func:`split_causal_attention` computes a chunk's bottom-right causal attention over (past +
itself) as the unmasked past plus the top-left causal chunk. Every function here is pure: no
state, no fallback.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from ...model import causal_attention

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


def merge_by_lse(parts: Iterable[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """Softmax attention over the union of disjoint key sets, from each set's (output, lse), taken
    one at a time (``parts`` may be a generator: each is dropped once added). One part is returned
    as it is; more are summed in float32, rescaled to the running log-sum-exp as each comes in."""
    it = iter(parts)
    first = next(it, None)
    if first is None:
        raise ValueError("merge_by_lse: no parts to merge")
    out, lse = first
    acc = None
    for part, part_lse in it:
        if acc is None:
            acc, out = out.to(torch.float32, copy=True), None
        total = torch.logaddexp(lse, part_lse)
        acc.mul_(torch.exp(lse - total).unsqueeze(-1))
        acc.addcmul_(part, torch.exp(part_lse - total).unsqueeze(-1))
        lse = total
        del part, part_lse  # not alive while the next part is computed
    return out if acc is None else acc.to(dtype)


def past_attention(
    attend: LseAttention, q: Tensor, pasts: Iterable[tuple[Tensor, Tensor]]
) -> Iterator[tuple[Tensor, Tensor]]:
    """(output, lse) of ``q`` (b, heads, t, d) over each (k, v) (b, kv_heads, s, d) of ``pasts``,
    unmasked, one past at a time as they are asked for (``pasts`` may be a generator that reads
    each from the cache). GQA: the queries of one kv head are stacked along the sequence (no copy
    of the keys)."""
    b, heads, t, d = q.shape
    for k, v in pasts:
        kv_heads = k.shape[1]
        stacked = q.reshape(b, kv_heads, heads // kv_heads * t, d)  # query head i uses kv head i // groups
        out, lse = attend(stacked, k, v, False)
        yield out.reshape(b, heads, t, d), lse.reshape(b, heads, t)
        del k, v, stacked, out, lse  # this piece is not alive while the next one is read


def split_causal_attention(
    attend: LseAttention,
    q: Tensor,
    k_past: Tensor | list[Tensor],
    v_past: Tensor | list[Tensor],
    k_new: Tensor,
    v_new: Tensor,
) -> Tensor:
    """Causal attention of a chunk's queries over (cached past + its own keys) as two kernels: the
    past unmasked, the chunk with a plain (top-left) causal mask, merged by their log-sum-exps.
    Both kernels skip what a bottom-right mask would hide, which the masked kernels do not, and on
    GPU the past can go to cuDNN, which takes no such mask. The past may be several segments
    (``k_past``/``v_past`` lists: runs of paged blocks read in place); see
    :func:`chunk_over_pasts` for a past read a piece at a time."""
    pasts = list(zip(k_past, v_past, strict=True)) if isinstance(k_past, list) else [(k_past, v_past)]
    return chunk_over_pasts(attend, q, pasts, k_new, v_new)


def chunk_over_pasts(
    attend: LseAttention, q: Tensor, pasts: Iterable[tuple[Tensor, Tensor]], k_new: Tensor, v_new: Tensor
) -> Tensor:
    """:func:`split_causal_attention` over a past given as (k, v) pieces (b, kv_heads, s, d), read
    as they are asked for and merged one at a time (:func:`merge_by_lse`). GQA: the queries of one
    kv head are stacked along the sequence for the past (no copy of the past keys), and the
    chunk's own few keys are repeated per query head."""

    def own() -> Iterator[tuple[Tensor, Tensor]]:  # the chunk's own part, after the past's
        groups = q.shape[1] // k_new.shape[1]
        kn, vn = k_new, v_new
        if groups > 1:
            kn, vn = kn.repeat_interleave(groups, dim=1), vn.repeat_interleave(groups, dim=1)
        yield attend(q, kn, vn, True)

    return merge_by_lse(itertools.chain(past_attention(attend, q, pasts), own()), q.dtype)


def agrees_with_plain(out: Tensor, q: Tensor, kp: Tensor, vp: Tensor, k: Tensor, v: Tensor, rows: int = 16) -> bool:
    """Whether ``out`` (a chunk's attention over past + itself) matches the plain bottom-right causal
    path on the chunk's first ``rows`` queries (the reference costs those rows only)."""
    r = min(rows, q.shape[2])
    keys, values = torch.cat((kp, k[:, :, :r]), dim=2), torch.cat((vp, v[:, :, :r]), dim=2)
    expected = causal_attention(q[:, :, :r], keys, values, past=kp.shape[2]).float()
    return torch.allclose(out[:, :, :r].float(), expected, atol=2e-2, rtol=2e-2)


def query_rows(q: Tensor) -> Tensor:
    """``q`` (1, heads, tokens, head_dim) as (tokens, heads, head_dim) with each token's heads
    contiguous, as the native kernels read it (a view where it already is)."""
    rows = q[0].transpose(0, 1)
    if rows.stride(2) != 1 or rows.stride(1) != rows.shape[2]:
        rows = rows.contiguous()
    return rows
