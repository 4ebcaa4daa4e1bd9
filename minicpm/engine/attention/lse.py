"""Attention as parts merged by their log-sum-exps: the building block of the paths that read a
sequence's context as several pieces (runs of blocks, or a cached past and a new chunk).

Contract: an :data:`LseAttention` kernel takes ``(q, k, v, is_causal)`` of shape (b, heads, t, d)
with as many query as key heads and returns (output, float32 log-sum-exp of the scores with shape
``q.shape[:-1]``). :func:`merge_by_lse` turns the parts of disjoint key sets into softmax attention
over their union; :func:`split_causal_attention` computes a chunk's bottom-right causal attention
over (past + itself) as the unmasked past plus the top-left causal chunk. Every function here is
pure: no state, no fallback.
"""

from __future__ import annotations

from collections.abc import Callable

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
    (``k_past``/``v_past`` lists: runs of paged blocks read in place). GQA: the queries of one kv
    head are stacked along the sequence for the past (no copy of the past keys), and the chunk's
    own few keys are repeated per query head."""
    pasts = list(zip(k_past, v_past, strict=True)) if isinstance(k_past, list) else [(k_past, v_past)]
    parts = past_attention(attend, q, pasts)
    groups = q.shape[1] // k_new.shape[1]
    if groups > 1:
        k_new, v_new = k_new.repeat_interleave(groups, dim=1), v_new.repeat_interleave(groups, dim=1)
    parts.append(attend(q, k_new, v_new, True))
    return merge_by_lse(parts, q.dtype)


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
