"""The next-token choice of one engine step, batched: :class:`Sampler`.

Contract: ``sampler.sample(logits, seqs)`` takes the float32 logits of the rows that sample this step
(one per sequence, in order) and returns one :class:`Sampled` per row: the token id and, for
requests that asked for ``logprobs``, its log-probability and the top alternatives. All rows are
processed together (:mod:`minicpm.sampling`): ``min_tokens`` masks the stop ids of rows still short
of it, penalties, greedy argmax, temperature, then :func:`draw`: top-k / top-p / min-p (the rules
of Hugging Face's warpers) and one uniform per sampled row from its request's generator, turned
into a token by the inverse CDF of what the filters keep (probabilities in vocabulary order).
Filters are decided among each row's 256 most likely tokens whenever that provably contains all it
keeps (nearly always: top-k up to 255, a top-p mass reached within them, a min-p floor above the
256th), so a step sorts 256 candidates per row, not the vocabulary. Logprobs are of the model's
raw distribution (log-softmax of the logits before any processing, as vLLM reports them by
default). A step costs one host synchronisation, whatever the mix.

A request with a ``grammar`` (constrained decoding, e.g. JSON that follows a schema) gets an
llguidance matcher that advances with its tokens; each step its allowed tokens are applied to the
row as a bitmask before the choice, so only tokens that keep the output valid can be picked (the
stop ids only once the grammar may end). The matchers need the text tokenizer
(:meth:`Sampler.set_tokenizer`).

The token history that penalties need is kept per request as two vocabulary-sized rows (ids seen
in the prompt or output; counts of output ids), built once when the request first samples and
updated with each token, never rebuilt from the token list. ``release(request_id)`` drops it
(the engine calls it when a request ends); a preempted request keeps it, since its tokens stay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ..sampling import SamplingParams, apply_penalties
from .sequence import Sequence

CANDIDATES = 256  # a row's most likely tokens among which its filters are decided when they can be


def _kept(values: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Which of each row's probabilities ``values`` (sorted descending, all the row's tokens that
    can be kept) top-k (ties kept), then top-p (over the top-k mass), then min-p keep."""
    keep = torch.ones_like(values, dtype=torch.bool)
    k = top_k.clamp(min=1, max=values.shape[-1])
    kth = values.gather(-1, (k - 1)[:, None])
    keep &= (values >= kth) | (top_k == 0)[:, None]
    kept = values * keep
    total = torch.where(top_k > 0, kept.cumsum(-1)[:, -1], 1.0)  # softmax mass: 1 without top-k
    before = kept.cumsum(-1) - kept  # mass ranked above each token
    keep &= (before < top_p[:, None] * total[:, None]) | (top_p >= 1)[:, None]
    keep &= values >= min_p[:, None] * values[:, :1]
    return keep


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Index, per row, where the running sum of ``weights`` first exceeds ``u`` times its total."""
    cdf = weights.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
    last = (weights > 0).long().cumsum(-1).argmax(-1)  # the last index with weight (u * total rounding up)
    return torch.minimum(idx, last)


def draw(probs: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, u: Tensor) -> Tensor:
    """One token id per row of ``probs`` (n, vocab): the inverse CDF at ``u`` (n,) of the tokens that
    :func:`_kept` keeps, their probabilities taken in vocabulary order. Rows whose filters are
    decided within their :data:`CANDIDATES` most likely tokens sort only those; others (and rows
    with no filter) use the whole vocabulary: the same token either way."""
    n, vocab = probs.shape
    tokens = torch.empty(n, dtype=torch.long, device=probs.device)
    filtered = (top_k > 0) | (top_p < 1) | (min_p > 0)
    rows = torch.arange(n, device=probs.device)
    covered = torch.zeros(n, dtype=torch.bool, device=probs.device)
    if vocab > CANDIDATES and bool(filtered.any()):
        top = probs.topk(CANDIDATES, dim=-1)
        mass, floor = top.values.sum(-1), min_p * top.values[:, 0]
        within = (top_k > 0) & (top_k < CANDIDATES)
        within |= (top_k == 0) & (((top_p < 1) & (mass >= top_p)) | ((min_p > 0) & (top.values[:, -1] < floor)))
        covered = filtered & within
        if bool(covered.any()):
            i = rows[covered]
            ids, values = top.indices[i], top.values[i]
            keep = _kept(values, top_k[i], top_p[i], min_p[i])
            ids, order = ids.sort(-1)  # vocabulary order
            weights = (values * keep).gather(-1, order)
            tokens[i] = ids.gather(-1, _inverse_cdf(weights, u[i])[:, None])[:, 0]
    rest = ~covered
    if bool(rest.any()):
        i = rows[rest]
        weights = probs[i]
        needs = filtered[i]
        if bool(needs.any()):  # filters not decided within the candidates: sort the vocabulary
            j = i[needs]
            values, order = probs[j].sort(-1, descending=True)
            keep = torch.zeros_like(values, dtype=torch.bool).scatter(
                -1, order, _kept(values, top_k[j], top_p[j], min_p[j])
            )
            weights = weights.clone()
            weights[needs] = weights[needs] * keep
        tokens[i] = _inverse_cdf(weights, u[i])
    return tokens


@dataclasses.dataclass
class Sampled:
    token_id: int
    logprob: float | None = None  # of token_id, when the request asked for logprobs
    top: list[tuple[int, float]] | None = None  # the request's top-k (id, logprob), best first


class _History:
    """Prompt-or-output presence and output counts of one request, as vocabulary rows."""

    def __init__(self, seq: Sequence, vocab: int, device: torch.device) -> None:
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab, dtype=torch.int32, device=device)
        self.seen[torch.tensor(seq.token_ids, dtype=torch.long, device=device)] = True
        out = seq.output_ids
        if out:
            ids = torch.tensor(out, dtype=torch.long, device=device)
            self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        self.length = seq.num_tokens  # tokens taken in so far

    def take(self, seq: Sequence) -> None:
        """Add the tokens appended since the last call."""
        for token in seq.token_ids[self.length :]:
            self.seen[token] = True
            self.counts[token] += 1
        self.length = seq.num_tokens


class _Constraint:
    """An llguidance matcher fed with a request's output tokens as they come."""

    def __init__(self, matcher: Any, seq: Sequence) -> None:
        self.matcher = matcher
        self.length = seq.num_prompt_tokens

    def take(self, seq: Sequence) -> None:
        for token in seq.token_ids[self.length :]:
            self.matcher.consume_token(token)
        self.length = seq.num_tokens


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._histories: dict[str, _History] = {}
        self._constraints: dict[str, _Constraint] = {}
        self._tokenizer: Any = None
        self._eos: list[int] = []
        self._grammar_tokenizer: Any = None

    def set_tokenizer(self, tokenizer: Any, eos_ids: list[int]) -> None:
        """What grammar matchers need: the text tokenizer (read only when the first grammar comes)
        and the stop ids."""
        self._tokenizer, self._eos = tokenizer, sorted(eos_ids)

    def release(self, request_id: str) -> None:
        self._histories.pop(request_id, None)
        self._constraints.pop(request_id, None)

    def _tokenizer_for_grammars(self) -> Any:
        import llguidance

        if self._grammar_tokenizer is None:
            if not hasattr(self._tokenizer, "to_json"):
                raise ValueError("constrained decoding needs the engine's tokenizer")
            self._grammar_tokenizer = llguidance.LLTokenizer(
                self._tokenizer.to_json(), n_vocab=self.vocab_size, eos_token=self._eos or None
            )
        return self._grammar_tokenizer

    def check_grammar(self, grammar: str) -> str | None:
        """The error of ``grammar`` on this vocabulary, or None. Callable from any thread: it also
        pays the one-time costs (importing the bitmask kernels, indexing the vocabulary) there,
        not in the engine's step."""
        import llguidance
        import llguidance.torch  # slow first import (it loads triton): paid here, not in a step

        matcher = llguidance.LLMatcher(self._tokenizer_for_grammars(), grammar)
        if matcher.is_error():
            return matcher.get_error().split("\n", 1)[0]
        # A grammar that admits no output at all (e.g. a JSON schema whose $ref only refers to
        # itself) fails only once the first token mask is asked for.
        mask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error():
            reason = matcher.get_error().split("\n", 1)[0]  # the rest is the parser's state dump
            return f"no output can satisfy it (a $ref that only refers to itself?); llguidance: {reason}"
        return None

    def _constraint(self, seq: Sequence) -> _Constraint:
        c = self._constraints.get(seq.request_id)
        if c is None:
            import llguidance

            matcher = llguidance.LLMatcher(self._tokenizer_for_grammars(), seq.params.grammar)
            c = self._constraints[seq.request_id] = _Constraint(matcher, seq)
        c.take(seq)
        return c

    def _apply_grammars(self, logits: Tensor, rows: list[int], seqs: list[Sequence]) -> Tensor:
        from llguidance.torch import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

        mask = allocate_token_bitmask(len(rows), self.vocab_size)
        for j, i in enumerate(rows):
            fill_next_token_bitmask(self._constraint(seqs[i]).matcher, mask, j)
        index = self._column(rows, torch.long)
        constrained = logits[index]
        apply_token_bitmask_inplace(constrained, mask.to(logits.device))
        stuck = torch.isinf(constrained).all(dim=-1)  # a matcher in error: let the request stop
        if self._eos and bool(stuck.any()):
            constrained[stuck.nonzero()[:, :1], self._column(self._eos, torch.long)] = 0.0
        logits[index] = constrained
        return logits

    def _history(self, seq: Sequence) -> _History:
        history = self._histories.get(seq.request_id)
        if history is None:
            history = self._histories[seq.request_id] = _History(seq, self.vocab_size, self.device)
        else:
            history.take(seq)
        return history

    def _column(self, values: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def sample(self, logits: Tensor, seqs: list[Sequence]) -> list[Sampled]:
        if not seqs:
            return []
        params: list[SamplingParams] = [s.params for s in seqs]
        n = len(seqs)
        raw = logits
        # min_tokens: the stop ids of rows still short of it cannot be chosen
        banned = [(i, t) for i, s in enumerate(seqs) if len(s.output_ids) < s.params.min_tokens for t in s.stop_ids]
        if banned:
            logits = logits.clone()
            rows, ids = zip(*banned, strict=True)
            logits[self._column(list(rows), torch.long), self._column(list(ids), torch.long)] = float("-inf")
        penalized = [i for i, p in enumerate(params) if p.penalized]
        if penalized:
            histories = [self._history(seqs[i]) for i in penalized]
            rows = self._column(penalized, torch.long)
            logits = logits.clone() if logits is raw else logits
            logits[rows] = apply_penalties(
                logits[rows],
                torch.stack([h.seen for h in histories]),
                torch.stack([h.counts for h in histories]),
                self._column([params[i].repetition_penalty for i in penalized], torch.float32),
                self._column([params[i].presence_penalty for i in penalized], torch.float32),
                self._column([params[i].frequency_penalty for i in penalized], torch.float32),
            )
        grammars = [i for i, p in enumerate(params) if p.grammar is not None]
        if grammars:
            logits = self._apply_grammars(logits.clone() if logits is raw else logits, grammars, seqs)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            sp = [params[i] for i in sampled]
            x = (
                logits[self._column(sampled, torch.long)]
                / self._column([p.temperature for p in sp], torch.float32)[:, None]
            )
            u = torch.cat([torch.rand(1, generator=seqs[i].generator, device=self.device) for i in sampled])
            drawn = draw(
                x.softmax(dim=-1),
                self._column([p.top_k for p in sp], torch.long),
                self._column([p.top_p for p in sp], torch.float32),
                self._column([p.min_p for p in sp], torch.float32),
                u,
            )
            tokens = tokens.index_copy(0, self._column(sampled, torch.long), drawn)
        wants = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wants:
            return [Sampled(t) for t in tokens.tolist()]
        # logprobs of the raw distribution; everything comes back in one transfer
        k = max(params[i].logprobs for i in wants)
        rows = self._column(wants, torch.long)
        logp = torch.log_softmax(raw[rows], dim=-1)
        chosen = logp.gather(-1, tokens[rows][:, None])[:, 0]
        top = logp.topk(k, dim=-1) if k else None
        parts = [tokens.double(), chosen.double()]
        if top is not None:
            parts += [top.values.double().flatten(), top.indices.double().flatten()]
        host = torch.cat(parts).tolist()
        out = [Sampled(int(t)) for t in host[:n]]
        chosen_host = host[n : n + len(wants)]
        values = host[n + len(wants) : n + len(wants) * (1 + k)]
        indices = host[n + len(wants) * (1 + k) :]
        for j, i in enumerate(wants):
            out[i].logprob = chosen_host[j]
            m = params[i].logprobs
            out[i].top = [(int(indices[j * k + r]), values[j * k + r]) for r in range(m)]
        return out
