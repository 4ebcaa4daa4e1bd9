"""Perplexity of a text, measured the way llama.cpp's ``perplexity`` tool does: :func:`perplexity`.

Contract: the text is tokenized whole (no chat template, a BOS first where the tokenizer adds one),
cut into windows of ``context`` tokens that start every ``stride`` tokens (default ``context``:
non-overlapping chunks, as llama.cpp's). Each window is one forward from scratch; only its last
``min(stride, context // 2)`` tokens are scored (with the default stride, the second half: every
scored token sees at least ``context / 2`` tokens before it), each scored at most once. The result
is ``exp(mean NLL)`` over the scored tokens with its standard error by the delta method
(``ppl * sd(NLL) / sqrt(n)``), what llama.cpp prints as ``PPL = x +/- e``.

The forward is the engine's own prepared model (``llm.engine.runner.model``), so the figure is of
the weights as they run, ``--quantize int8`` included. With a quantized KV format
(``--kv-cache-dtype int8``/``int4``: the engine's ``runner.kv_format``), every layer's keys and
values are stored and read back as the paged cache stores them, and each token attends to that
round trip of every token up to itself, its own included (rotated as the cache rotates them:
:mod:`minicpm.engine.attention.kv_format`): what a decode step reads from the cache
(llama.cpp's ``-ctk``/``-ctv`` in ``llama-perplexity`` measure the same). A text shorter than one window, or a window
that does not fit the model's context, is a ``ValueError`` naming the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.attention.kv_format import rotate_heads
from ..errors import UserError
from ..model import causal_attention


@dataclass
class Perplexity:
    perplexity: float
    stderr: float
    mean_nll: float
    scored_tokens: int
    windows: int
    text_tokens: int
    context: int
    stride: int

    def line(self) -> str:
        return (
            f"PPL = {self.perplexity:.4f} +/- {self.stderr:.4f} ({self.scored_tokens} tokens scored in "
            f"{self.windows} windows of {self.context}, stride {self.stride}; the text is {self.text_tokens} tokens)"
        )


def window_plan(num_tokens: int, context: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of each window; the scored offsets run to the window's end."""
    if context < 2:
        raise UserError(f"--context must be at least 2, got {context}")
    if not 1 <= stride <= context:
        raise UserError(f"--stride must be from 1 to --context ({context}), got {stride}")
    if num_tokens < context:
        raise UserError(f"the text is {num_tokens} tokens, shorter than one window of --context {context}")
    scored = min(stride, context // 2)
    return [(start, context - scored) for start in range(0, num_tokens - context + 1, stride)]


class RoundTripCache:
    """One window's attention over keys and values as a KV format stores them (see the module
    docstring): an :class:`~minicpm.model.AttentionCache` that keeps nothing across forwards."""

    length = 0

    def __init__(self, kv_format: Any, rotation: Tensor | None = None) -> None:
        self.format, self.rotation = kv_format, rotation

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        h = self.rotation
        if h is not None:
            q, k, v = rotate_heads(q, h), rotate_heads(k, h), rotate_heads(v, h)
        out = causal_attention(q, self.format.round_trip(k), self.format.round_trip(v, value=True))
        return out if h is None else rotate_heads(out, h)


@torch.inference_mode()
def perplexity(
    model: Any,
    ids: list[int],
    context: int,
    stride: int | None = None,
    kv_format: Any = None,
    rotation: Tensor | None = None,
) -> Perplexity:
    """Perplexity of ``ids`` under ``model`` (a :class:`~minicpm.MiniCPMForCausalLM`, as prepared);
    ``kv_format``: a quantized :class:`~minicpm.engine.attention.kv_format.KVFormat` to score
    through (None or a float format: attention in the activations' own dtype), rotated by
    ``rotation`` where the engine's cache is (``PagedKVCache.rotation``)."""
    quantized = kv_format is not None and kv_format.quantized
    cache = RoundTripCache(kv_format, rotation) if quantized else None
    stride = stride or context
    limit = model.config.context_length
    if context > limit:
        raise UserError(f"--context {context} is longer than the model's context ({limit} tokens)")
    plan = window_plan(len(ids), context, stride)
    nll: list[Tensor] = []
    for start, first in plan:
        window = torch.tensor([ids[start : start + context]], device=model.device)
        keep = torch.arange(first - 1, context - 1, device=model.device)
        logits = model(window, cache=cache, logits_to_keep=keep)[0]
        targets = window[0, first:]
        nll.append(-torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None])[:, 0].cpu())
    values = torch.cat(nll)
    mean = values.mean().item()
    sd = values.std().item() if values.numel() > 1 else 0.0
    ppl = math.exp(mean)
    return Perplexity(
        perplexity=ppl,
        stderr=ppl * sd / math.sqrt(values.numel()),
        mean_nll=mean,
        scored_tokens=values.numel(),
        windows=len(plan),
        text_tokens=len(ids),
        context=context,
        stride=stride,
    )
