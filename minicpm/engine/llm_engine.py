"""The engine: :class:`LLMEngine` (one thread, step by step) and its request/output types.

Contract:

* ``add_request(prompt, params, request_id=None)`` validates and queues a request and returns its
  id. A prompt that is empty, holds ids outside the vocabulary, or leaves no room for an answer
  within ``max_model_len`` (the model's context, capped by what the KV cache can hold) raises
  ``ValueError`` with the numbers; the engine and the other requests are untouched. ``max_tokens``
  is capped so prompt plus answer always fits one sequence's worth of KV.
* ``step()`` runs one scheduled forward (:class:`~minicpm.engine.scheduler.Scheduler`,
  :class:`~minicpm.engine.model_runner.ModelRunner`) and returns a :class:`RequestOutput` for each
  request that produced text or finished: the new text (detokenized incrementally; held back while
  it could still grow into a stop string), the new token ids, and at the end ``finish_reason``
  ``"stop"``, ``"length"`` or ``"abort"``. A generated stop id (end of sequence, ``<|im_end|>``,
  ``stop_token_ids``) is a generated token, as in vLLM and transformers: it is the last of the token
  ids (and logprobs) and counts as output, but adds no text; a stop string ends the text before it
  (the token ids keep the token that completed it, as vLLM's do).
* On CPU, the thread count follows the machine's load (:class:`~minicpm.engine.threads.ThreadGovernor`):
  fewer threads while other processes keep cores busy, back when they stop.
* A step is atomic per request: if finishing one request's token fails (detokenizing, a stop
  check), that request alone ends with ``finish_reason`` ``"error"`` and the message in
  ``error``, its blocks freed; the other requests of the step go on.
* ``abort_request(id)`` ends a request at once and frees its blocks.
* ``generate(prompts, params)`` runs a list of prompts to completion with continuous batching.
* With ``kv_cache_dir``, full blocks of long prompts persist on disk and are loaded on admission
  (:mod:`minicpm.engine.kv_store`; counted in ``stats()`` as ``kv_store_*``); ``close()`` writes
  what is queued (so does interpreter exit).
* Greedy results do not depend on what else is in the batch, to rounding: each sequence attends
  only to its own keys, with its own NTK base (from its prompt length), and its token is an argmax
  of its row. Bitwise, a decode row's logits do not depend on a neighbour's prefill in the same
  step (docs/engine.md, "Determinism", says exactly what holds).

The engine takes the model over: it fuses its projections and gives its linear layers this
machine's product, in place (:mod:`minicpm.engine.layers`). Nothing here is thread-safe:
:class:`~minicpm.engine.async_engine.BackgroundEngine` owns an engine in its own thread for
servers; ``make_request`` (validation and tokenization only) is the
one method other threads may call.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence as Seq

from ..errors import UserError
from ..model import MiniCPMForCausalLM
from ..plan import format_bytes
from ..sampling import SamplingParams
from ..tokenizer import IncrementalDecoder, Tokenizer
from .block_manager import BlockManager
from .config import EngineConfig
from .kv_store import STATS as KV_STORE_STATS
from .kv_store import PrefixStore
from .model_runner import ModelRunner
from .sampler import Sampled
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus
from .threads import ThreadGovernor, thread_stats

log = logging.getLogger("minicpm.engine")


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (stop id or string), "length", "abort" or "error"
    cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error": what failed

    def add(self, out: RequestOutput) -> None:
        """Take in one :class:`RequestOutput` of this completion's request."""
        self.text += out.text
        self.token_ids += out.token_ids
        if out.finished:
            self.finish_reason, self.cached_tokens, self.error = out.finish_reason, out.cached_tokens, out.error


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the previous output of this request
    token_ids: list[int]  # new token ids since the previous output
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    logprobs: list[Sampled] | None = None  # per new token id, when the request asked for logprobs
    queue_time: float | None = None  # seconds from the request to its first scheduling, once finished
    # with prompt_logprobs, in the request's first output: entry p scores prompt token p + 1
    prompt_logprobs: list[Sampled] | None = None
    error: str | None = None  # finish_reason "error": finishing this request's token failed


def held_back(text: str, stops: Seq[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


@dataclasses.dataclass(eq=False)
class Request:
    """A sequence plus the state of its text."""

    seq: Sequence
    decoder: IncrementalDecoder | None  # None: token ids only
    text: str = ""
    emitted: int = 0
    new_ids: list[int] = dataclasses.field(default_factory=list)
    new_logprobs: list[Sampled] = dataclasses.field(default_factory=list)
    first_output_sent: bool = False

    @property
    def request_id(self) -> str:
        return self.seq.request_id


class LLMEngine:
    def __init__(
        self, model: MiniCPMForCausalLM, tokenizer: Tokenizer | None, config: EngineConfig | None = None
    ) -> None:
        self.config = (config or EngineConfig()).resolved(model.device.type)
        self.model_config = model.config
        self.tokenizer = tokenizer
        context = self.model_config.context_length
        self.max_model_len = min(self.config.max_model_len or context, context)
        self.runner = ModelRunner(model, self.config, self.max_model_len)
        self.kv_capacity = self.runner.num_blocks * self.config.block_size
        self.max_model_len = min(self.max_model_len, self.kv_capacity)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            self.config.block_size,
            self.config.enable_prefix_caching,
            contiguous=self.runner.device.type == "cpu",
        )
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.prefix_store: PrefixStore | None = None  # the persistent prefix cache (kv_cache_dir)
        if self.config.kv_cache_dir is not None:
            self.prefix_store = PrefixStore.open(self.config, self.runner, self.block_manager)
            self.scheduler.on_admit = self.prefix_store.admit
        self.governor = ThreadGovernor() if model.device.type == "cpu" else None
        if self.governor is not None and self.governor.enabled:
            self.runner.cache.on_layer = self.governor.tick  # long prefill steps follow the load too
        self.requests: dict[str, Request] = {}
        base = set(self.model_config.eos_token_ids)
        if tokenizer is not None:
            for token in (tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")):
                if token is not None:
                    base.add(token)
        self.eos_ids = frozenset(base)
        self.runner.sampler.set_tokenizer(tokenizer, sorted(base))
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.num_request_errors = 0  # requests ended by an error while finishing a token (logged each)

    @property
    def device(self):
        return self.runner.device

    # ------------------------------------------------------------------ requests
    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_ids
        return frozenset(ids)

    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("this engine has no tokenizer: give the prompt as token ids")
            at_least = self.tokenizer.min_tokens(len(prompt))
            if at_least >= self.max_model_len:  # refused before tokenizing it whole
                raise self._too_long(f"{len(prompt):,} characters, at least {at_least:,} tokens")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise UserError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {vocab})")
        if len(ids) >= self.max_model_len:
            raise self._too_long(f"{len(ids)} tokens", len(ids) + 1)
        return ids

    def _too_long(self, size: str, needed: int | None = None) -> UserError:
        """The error for a prompt of ``size`` (``needed`` tokens with one for the answer) that
        leaves no room for an answer; where the KV cache is the limit, it names the
        ``kv_cache_dtype`` that would hold it in the same memory, or the ``kv_cache_memory`` that
        would."""
        context = self.model_config.context_length
        if self.max_model_len < context and self.max_model_len == self.kv_capacity:
            r = self.runner
            per_token = r.kv_bytes_per_token
            total = format_bytes(self.kv_capacity * per_token)
            fix = "give the engine more KV memory"
            if needed is not None and needed <= context:
                fix = self._kv_fix(needed)
            return UserError(
                f"the prompt is {size}; the KV cache holds {self.kv_capacity} tokens "
                f"({total} at {format_bytes(per_token)} per token in {r.kv_format.name}; the model's "
                f"context is {context}), which leaves no room for an answer: {fix}"
            )
        return UserError(
            f"the prompt is {size}; the model's context is {self.max_model_len} tokens, "
            "which leaves no room for an answer"
        )

    def _kv_fix(self, needed: int) -> str:
        """What would hold ``needed`` tokens: a smaller KV format in the same budget, else a budget."""
        from .attention.kv_format import resolve_kv_format

        r, c, bs = self.runner, self.model_config, self.config.block_size
        blocks = -(-needed // bs)
        options = []
        for name in ("int8", "int4"):
            try:
                fmt = resolve_kv_format(name, r.dtype, r.device, c.head_dim)
            except UserError:
                continue
            per = fmt.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
            if per >= r.kv_bytes_per_token:
                continue
            holds = r.kv_budget // (bs * per) * bs
            if holds >= needed:
                return f"'kv_cache_dtype' {name} holds {holds} tokens in the same memory"
            options.append(f"{format_bytes(blocks * bs * per)} with 'kv_cache_dtype' {name}")
        more = f"'kv_cache_memory' of at least {format_bytes(blocks * r.bytes_per_block)}"
        return more + (f" (or {', or '.join(options)})" if options else "")

    def capacity_line(self) -> str:
        """How many tokens of context the KV cache holds, in which format, from what budget."""
        r = self.runner
        per = r.kv_bytes_per_token
        return (
            f"KV cache: {self.kv_capacity:,} tokens in {r.kv_format.name} ({format_bytes(per)} a token, "
            f"{format_bytes(self.kv_capacity * per)}; budget: {r.kv_budget_source}); one request's context "
            f"is up to {self.max_model_len:,} tokens (the model's: {self.model_config.context_length:,})"
        )

    def make_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and tokenize; touches no engine state (safe from any thread)."""
        params = params or SamplingParams()
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        ids = self.encode_prompt(prompt)
        config = self.model_config
        bad = [i for i in params.stop_token_ids if not 0 <= i < config.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} are outside the vocabulary (size {config.vocab_size})")
        seq = Sequence(
            request_id=request_id if request_id is not None else uuid.uuid4().hex,
            prompt_ids=ids,
            params=params,
            stop_ids=self.stop_token_ids(params),
            max_tokens=min(params.max_new_tokens, self.max_model_len - len(ids)),
            rope_length=len(ids),
            hash_seed=("minicpm-kv", config.rope_type, config.rope_base(len(ids))),
            generator=params.make_generator(self.device),
        )
        return Request(seq, IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None)

    def add(self, request: Request) -> str:
        if request.request_id in self.requests:
            raise UserError(f"request id {request.request_id!r} is already in flight")
        self.requests[request.request_id] = request
        self.scheduler.add(request.seq)
        self.num_prompt_tokens += request.seq.num_prompt_tokens
        return request.request_id

    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        return self.add(self.make_request(prompt, params, request_id))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request.seq, "abort")
        return self._output(request, finished=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        if self.governor is not None:
            self.governor.tick()  # CPU: follow the machine's load (a clock read when nothing is due)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():  # cannot happen: every request fits the cache alone
                raise RuntimeError(f"the scheduler made no progress: {self.stats()}")
            return []
        tokens = iter(self.runner.run(batch))
        self.num_steps += 1
        outputs = []
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
            if self.prefix_store is not None:
                self.prefix_store.computed(seq)  # queues new full prompt blocks; never waits
            if seq.num_computed_tokens == seq.num_tokens:
                request, sampled = self.requests[seq.request_id], next(tokens)
                try:
                    out = self._on_token(request, sampled)
                except Exception as exc:  # this request alone ends; the step goes on for the others
                    out = self._fail(request, exc)
                if out is not None:
                    outputs.append(out)
        return outputs

    def _fail(self, request: Request, exc: Exception) -> RequestOutput:
        """End ``request`` with finish_reason "error" (its blocks freed, its state dropped); logged
        with its traceback and counted in :meth:`stats` (``request_errors``)."""
        log.exception("request %s failed while finishing its token", request.request_id)
        self.num_request_errors += 1
        seq = request.seq
        if not seq.is_finished:
            self.scheduler.finish(seq, "error")
        seq.finish_reason = "error"
        self.requests.pop(seq.request_id, None)
        self.runner.sampler.release(seq.request_id)
        return RequestOutput(
            request_id=seq.request_id,
            text="",
            token_ids=[],
            finished=True,
            finish_reason="error",
            prompt_tokens=seq.num_prompt_tokens,
            output_tokens=len(seq.output_ids),
            cached_tokens=seq.num_cached_tokens,
            error=f"{type(exc).__name__}: {exc}",
        )

    def _on_token(self, request: Request, sampled: Sampled) -> RequestOutput | None:
        seq, params = request.seq, request.seq.params
        token = sampled.token_id
        stopped = token in seq.stop_ids and len(seq.output_ids) >= params.min_tokens
        seq.token_ids.append(token)  # a stop id too: it was generated (counted, scored), only not shown
        request.new_ids.append(token)
        if params.logprobs is not None:
            request.new_logprobs.append(sampled)
        if stopped:
            self.scheduler.finish(seq, "stop")
            return self._output(request, finished=True)
        searched = len(request.text)
        if request.decoder is not None:
            request.text += request.decoder.push(token)
        cuts = []
        if params.stop and len(seq.output_ids) >= params.min_tokens and len(request.text) > searched:
            # only where the new text could complete a stop string (not the whole text every token)
            start = max(0, searched - max(len(s) for s in params.stop) + 1)
            cuts = [i for i in (request.text.find(s, start) for s in params.stop) if i >= 0]
        if cuts:
            request.text = request.text[: min(cuts)]
            self.scheduler.finish(seq, "stop")
            return self._output(request, finished=True, flush=False)
        if len(seq.output_ids) >= seq.max_tokens:
            self.scheduler.finish(seq, "length")
            return self._output(request, finished=True)
        return self._output(request, finished=False)

    def _output(self, request: Request, finished: bool, flush: bool = True) -> RequestOutput | None:
        seq = request.seq
        if finished:
            if flush and request.decoder is not None:
                request.text += request.decoder.flush()
            safe = len(request.text)
            del self.requests[seq.request_id]
            self.runner.sampler.release(seq.request_id)
        else:
            safe = len(request.text) - held_back(request.text, seq.params.stop)
        if not finished and safe <= request.emitted and not request.new_ids:
            return None
        delta = request.text[request.emitted : safe] if safe > request.emitted else ""
        request.emitted = max(request.emitted, safe)
        new_ids, request.new_ids = request.new_ids, []
        logprobs, request.new_logprobs = request.new_logprobs, []
        return RequestOutput(
            request_id=seq.request_id,
            text=delta,
            token_ids=new_ids,
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            prompt_tokens=seq.num_prompt_tokens,
            output_tokens=len(seq.output_ids),
            cached_tokens=seq.num_cached_tokens,
            logprobs=logprobs if seq.params.logprobs is not None else None,
            queue_time=(seq.first_scheduled or seq.created) - seq.created if finished else None,
            prompt_logprobs=self._prompt_logprobs(request),
        )

    @staticmethod
    def _prompt_logprobs(request: Request) -> list[Sampled] | None:
        if request.first_output_sent or request.seq.params.prompt_logprobs is None:
            return None
        request.first_output_sent = True
        scores = request.seq.prompt_logprobs or []
        return [s for s in scores if s is not None]

    # ------------------------------------------------------------------ offline batch
    def generate(
        self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run ``prompts`` to completion together; one :class:`Completion` per prompt, in order.

        For an engine with nothing else in flight (it steps every request, and would drop the
        outputs of others): refused otherwise. :class:`~minicpm.LLM` and the background engine
        track outputs per request instead."""
        if self.requests:
            raise ValueError(
                f"generate() needs an idle engine; {len(self.requests)} requests are in flight (read them with step())"
            )
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling parameter sets")
        requests = [self.make_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        results = {r.request_id: Completion("", [], r.seq.num_prompt_tokens, "length") for r in requests}
        for r in requests:
            self.add(r)
        try:
            while any(not r.seq.is_finished for r in requests):
                for out in self.step():
                    if out.request_id in results:
                        results[out.request_id].add(out)
        finally:
            for r in requests:
                if r.request_id in self.requests:
                    self.abort_request(r.request_id)
        return [results[r.request_id] for r in requests]

    def stats(self) -> dict[str, int | float | str]:
        bm = self.block_manager
        gov = self.governor
        return {
            "attention_backend": self.runner.attention_backend,
            "kernel_failures": sum(self.runner.cache.kernel_failures.values()),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "num_blocks": bm.num_blocks,
            "free_blocks": bm.num_free_blocks,
            "block_size": bm.block_size,
            "kv_capacity_tokens": self.kv_capacity,
            "kv_cache_dtype": self.runner.kv_format.name,
            "kv_bytes_per_token": self.runner.kv_bytes_per_token,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.num_steps,
            "prompt_tokens": self.num_prompt_tokens,
            "request_errors": self.num_request_errors,
            "cached_prompt_tokens": self.scheduler.num_cached_tokens,
            **(gov.stats() if gov is not None else thread_stats()),
            **{
                f"kv_store_{name}": value
                for name, value in (
                    self.prefix_store.stats() if self.prefix_store else dict.fromkeys(KV_STORE_STATS, 0)
                ).items()
            },
        }

    def close(self) -> None:
        """Write what the persistent prefix cache has queued and stop its writer (the engine
        still serves; later blocks are not stored). Nothing to do without ``kv_cache_dir``."""
        if self.prefix_store is not None:
            self.prefix_store.close()


__all__ = ["Completion", "LLMEngine", "Request", "RequestOutput", "SequenceStatus"]
