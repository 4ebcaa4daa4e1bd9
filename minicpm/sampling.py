"""Sampling parameters and the logits processing of one step, batched over rows.

Contract: :class:`SamplingParams` validates every field on construction (a bad value raises
``ValueError`` naming it). The processing functions take a float32 ``(rows, vocab)`` tensor and
one value per row, so a whole step is processed at once whatever each request asked for:

* :func:`apply_penalties`: Hugging Face's repetition penalty over prompt and generated ids (a
  seen token's logit divided by the penalty if positive, multiplied if negative), then OpenAI's
  presence and frequency penalties over generated ids (``logit -= presence * [count > 0] +
  frequency * count``), as vLLM applies them;
* :func:`filter_logits`: temperature already applied, top-k (ties with the k-th kept, as
  Hugging Face does), then top-p (nucleus, keeping at least one token), then min-p (tokens below
  ``min_p`` x the top probability) set to -inf; Hugging Face's warper order.

Temperature 0 (or below 1e-5, its limit) is greedy: the argmax after penalties. A seed makes
sampling reproducible (one ``torch.Generator`` per request). The engine's
:class:`~minicpm.engine.sampler.Sampler` keeps the per-request state (seen ids, counts) and runs
these once per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where sampling happens: the CLI validates flags without it
    import torch
    from torch import Tensor

GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's limit
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
# The card's example call: model.chat(tokenizer, query, temperature=0.8, top_p=0.8)
CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_p": 0.8, "max_new_tokens": 1024}


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None  # the chosen token's logprob and this many top alternatives (0-20)
    prompt_logprobs: int | None = None  # each prompt token's logprob (from the second) and top alternatives
    grammar: str | None = None  # an llguidance grammar (e.g. from a JSON schema) every output must follow

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> UserError:
            return UserError(f"sampling parameter {name!r} must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "a positive integer")
        if not _real(self.temperature) or not self.temperature >= 0:
            raise bad("temperature", "a finite number >= 0")
        if not _real(self.repetition_penalty) or not 0.01 <= self.repetition_penalty <= 100:
            raise bad("repetition_penalty", "in [0.01, 100] (1 is off)")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables it)")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise bad("seed", "an integer in [0, 2**64) or None")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        for name in ("presence_penalty", "frequency_penalty"):
            if not _real(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2] (0 is off)")
        if not _real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1] (0 is off)")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.min_tokens > self.max_new_tokens:
            raise UserError(
                f"sampling parameter 'min_tokens' ({self.min_tokens}) must be at most "
                f"'max_new_tokens' ({self.max_new_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            lp = getattr(self, name)
            if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
                raise bad(name, f"an integer in [0, {MAX_LOGPROBS}] or None")

    @property
    def penalized(self) -> bool:
        """Whether any penalty needs the request's token history."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        """Temperature 0, or below 1e-5 (its limit, which sampling could not represent: logits / T overflow)."""
        return self.temperature < GREEDY_BELOW

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        import torch

        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def apply_penalties(
    logits: Tensor,
    seen: Tensor,
    counts: Tensor,
    repetition: Tensor,
    presence: Tensor,
    frequency: Tensor,
) -> Tensor:
    """Penalised ``logits`` (rows, vocab): ``seen`` (bool) marks prompt and generated ids, ``counts``
    (int) counts generated ids; one repetition / presence / frequency value per row."""
    import torch

    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
    counts = counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def filter_logits(
    logits: Tensor, top_k: Tensor | None = None, top_p: Tensor | None = None, min_p: Tensor | None = None
) -> Tensor:
    """Set to -inf what top-k, then top-p, then min-p remove; one value per row, or None where no
    row uses that filter (a row's 0, 1 and 0 also mean off). Runs without a host synchronisation."""
    import torch

    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)[:, None]
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if min_p is not None:
        probs = logits.softmax(dim=-1)
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


# The MiniCPM card's example call: model.chat(tokenizer, query, temperature=0.8, top_p=0.8)
CARD_DEFAULTS: dict[str, float] = {"temperature": 0.8, "top_p": 0.8}
GENERATION_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
# what a setting is when neither the caller nor the checkpoint gives it (sampling, nothing filtered)
NEUTRAL_SETTINGS: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def with_defaults(given: dict[str, Any], defaults: dict[str, float]) -> dict[str, Any]:
    """Each of :data:`GENERATION_FIELDS`: the caller's value (None: unset), else the checkpoint's
    default (:func:`checkpoint_sampling_defaults`), else :data:`NEUTRAL_SETTINGS`."""
    return {
        k: given[k] if given.get(k) is not None else defaults.get(k, NEUTRAL_SETTINGS[k]) for k in GENERATION_FIELDS
    }


def checkpoint_sampling_defaults(path: str | Any) -> dict[str, float]:
    """Sampling defaults of a checkpoint directory: its ``generation_config.json`` (what the model's
    authors ship, or what :mod:`minicpm.default_model` records at conversion for a family whose
    card recommends values), else the MiniCPM card's temperature 0.8 / top-p 0.8."""
    import json
    from pathlib import Path

    file = Path(path) / "generation_config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    found = {k: data[k] for k in GENERATION_FIELDS if isinstance(data.get(k), (int, float))}
    if data.get("do_sample") is False:
        found["temperature"] = 0.0
    return found or dict(CARD_DEFAULTS)
