"""High-level generation and chat: :class:`LLM`.

Contract:

* ``LLM.from_pretrained(path=None)`` loads a checkpoint directory's model and tokenizer; without
  a path, the embedded default model (:mod:`minicpm.default_model`).
* Generation runs on an :class:`~minicpm.engine.LLMEngine` (paged KV cache, chunked prefill,
  prefix caching: a chat turn reuses the KV of the conversation so far), sized by
  ``engine_config``.
* ``generate(prompt, params)`` returns a :class:`Completion` (a list of prompts: a list of
  completions, run as one continuous batch); ``stream(prompt, params)`` yields text deltas whose
  concatenation is the completion's text; stopping the iteration aborts the request.
  Generation stops at the stop ids (the config's and the tokenizer's eos and, for ChatML
  vocabularies, ``<|im_end|>``; ``ignore_eos`` drops these), at a stop string (the text ends
  before it; nothing after it is produced) or after ``max_new_tokens``. A prompt that leaves no
  room in the model's context (or in the KV cache) is refused with a ``ValueError`` that gives
  both lengths.
* ``chat(query, history=None, system=None, ...)`` returns ``(response, history)`` like the card's
  ``model.chat``, without its defects: it stops at ``<|im_end|>``, keeps every generated token,
  never returns template markers, and ``max_new_tokens`` counts only the answer.
* Requests go to the engine's one request router
  (:class:`~minicpm.engine.async_engine.BackgroundEngine`), the same one a server over this LLM
  uses (:meth:`LLM.client`): one engine, one KV cache. One ``LLM`` may be shared by any number of
  threads: their calls are batched together, and each thread gets exactly what its call alone
  would produce, or an :class:`~minicpm.engine.client.EngineError` if the engine fails; never
  another's tokens. Leaving a stream early aborts its request (its blocks are free when the
  stream's ``close()`` returns). ``last_completion`` and ``last_history`` are per thread.
* ``stream`` and ``chat_stream`` take ``cancel`` (e.g. a ``threading.Event``): once it is set the
  request is aborted at the next step boundary and the completion ends with ``finish_reason``
  "abort", keeping what was generated (the CLI's Ctrl-C). The engine is never interrupted
  mid-step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .engine import Completion, EngineConfig, LLMEngine
from .engine.async_engine import BackgroundEngine, Cancel
from .model import MiniCPMForCausalLM
from .sampling import CARD_DEFAULTS, CHAT_DEFAULTS, SamplingParams, checkpoint_sampling_defaults
from .tokenizer import Tokenizer

__all__ = ["CHAT_DEFAULTS", "LLM", "Completion"]


class LLM:
    """A model and its tokenizer on an :class:`~minicpm.engine.LLMEngine`, ready to complete and chat."""

    def __init__(
        self,
        model: MiniCPMForCausalLM,
        tokenizer: Tokenizer,
        chat_format: str = "auto",
        engine_config: EngineConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        tokenizer.resolve_chat_template(chat_format)  # fail now on an unknown format
        self.engine = LLMEngine(self.model, tokenizer, engine_config)
        self._client = BackgroundEngine(self.engine)  # the engine's request router, shared with any server
        self._local = threading.local()
        # what a request that leaves temperature / top-p / top-k / repetition penalty unset gets
        self.sampling_defaults: dict[str, float] = dict(CARD_DEFAULTS)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        chat_format: str = "auto",
        engine_config: EngineConfig | None = None,
    ) -> LLM:
        from .default_model import resolve_model_path

        path = resolve_model_path(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = engine_config or EngineConfig()
        on_cpu = torch.device(device).type == "cpu"  # elsewhere quantized weights load dequantized
        model = MiniCPMForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device=device,
            quantize=config.quantize if on_cpu else "none",
            group_size=config.group_size,
        )
        llm = cls(model, Tokenizer.from_pretrained(path), chat_format=chat_format, engine_config=engine_config)
        llm.sampling_defaults = checkpoint_sampling_defaults(path)
        return llm

    @property
    def config(self):
        return self.model.config

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        return self.engine.stop_token_ids(params)

    def close(self) -> None:
        """Abort this LLM's own requests and close its engine (the persistent prefix cache, if
        any, writes what it has queued). Clients from :meth:`client` keep their requests; the
        engine still serves them, storing no more blocks."""
        self._client.close()
        self.engine.close()

    # ------------------------------------------------------------------ generation
    def client(self) -> BackgroundEngine:
        """A new client of this LLM's engine router, e.g. for a server
        (``ServerState(engine=llm.client(), ...)``): its requests share the LLM's batches and KV
        cache, with no second engine. Closing it ends its own requests; the LLM keeps working."""
        return BackgroundEngine(self.engine)

    def _run(
        self, prompt: str | Sequence[int], params: SamplingParams, state: Completion, cancel: Cancel | None = None
    ) -> Iterator[str]:
        request = self._client.make_request(prompt, params)
        state.prompt_tokens = request.seq.num_prompt_tokens
        for out in self._client.submit(request).until(cancel):
            state.add(out)
            if out.text:
                yield out.text

    def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        cancel: Cancel | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Text deltas of a completion of ``prompt`` (a string, or token ids); then
        ``last_completion`` (of this thread) holds the whole completion."""
        params = params or SamplingParams(**kwargs)
        state = Completion("", [], 0, "length")
        yield from self._run(prompt, params, state, cancel)
        self._local.completion = state

    def generate(
        self,
        prompt: str | Sequence[int] | list[str | Sequence[int]],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> Completion | list[Completion]:
        """Complete ``prompt``; keyword arguments build the :class:`SamplingParams`.

        A list of prompts (strings or token-id lists) runs as one continuous batch and returns a
        list of completions in order.
        """
        params = params or SamplingParams(**kwargs)
        if not (isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)):
            state = Completion("", [], 0, "length")
            for _ in self._run(prompt, params, state):
                pass
            return state
        requests = [self._client.make_request(p, params) for p in prompt]  # all validated before any runs
        states = [Completion("", [], r.seq.num_prompt_tokens, "length") for r in requests]
        streams = [self._client.submit(r) for r in requests]
        try:
            for stream, state in zip(streams, states, strict=True):
                for out in stream.until(None):
                    state.add(out)
        finally:  # a caller that leaves (an error, an interrupt) aborts what is left
            for stream in streams:
                stream.cancel()
        return states

    @property
    def last_completion(self) -> Completion:
        """The completion of this thread's last ``stream`` / ``chat_stream`` / ``chat``."""
        try:
            return self._local.completion
        except AttributeError:
            raise AttributeError("no completion yet in this thread: run stream() or chat_stream() first") from None

    @property
    def last_history(self) -> list[dict[str, Any]]:
        """The conversation after this thread's last ``chat_stream`` / ``chat`` turn."""
        try:
            return self._local.history
        except AttributeError:
            raise AttributeError("no chat turn yet in this thread: run chat_stream() first") from None

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ready for the answer."""
        return self.tokenizer.encode_chat(messages, chat_format=self.chat_format)

    @staticmethod
    def chat_messages(query: str, history: Sequence[dict[str, Any]] | None, system: str | None) -> list[dict[str, Any]]:
        messages = [dict(m) for m in history or []]
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"history entry {i} must have string 'role' and 'content', got {m!r}")
        if system is not None:
            if messages and messages[0]["role"] == "system":
                messages[0]["content"] = system
            else:
                messages.insert(0, {"role": "system", "content": system})
        messages.append({"role": "user", "content": query})
        return messages

    def chat_stream(
        self,
        query: str,
        history: Sequence[dict[str, Any]] | None = None,
        system: str | None = None,
        params: SamplingParams | None = None,
        cancel: Cancel | None = None,
    ) -> Iterator[str]:
        """Deltas of the answer; then ``last_history`` and ``last_completion`` (of this thread)
        hold the turn. A turn ended by ``cancel`` keeps the part of the answer given so far."""
        messages = self.chat_messages(query, history, system)
        params = params or SamplingParams(**CHAT_DEFAULTS)
        state = Completion("", [], 0, "length")
        yield from self._run(self.chat_prompt(messages), params, state, cancel)
        self._local.completion = state
        self._local.history = [*messages, {"role": "assistant", "content": state.text}]

    def chat(
        self,
        query: str,
        history: Sequence[dict[str, Any]] | None = None,
        system: str | None = None,
        temperature: float = CHAT_DEFAULTS["temperature"],
        top_p: float = CHAT_DEFAULTS["top_p"],
        max_new_tokens: int = CHAT_DEFAULTS["max_new_tokens"],
        **kwargs: Any,
    ) -> tuple[str, list[dict[str, Any]]]:
        """``(response, history)`` as the card's ``model.chat`` returns them (history is a new list).

        Keyword arguments beyond the card's are :class:`SamplingParams` fields (top_k, seed, stop, ...).
        """
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, **kwargs)
        for _ in self.chat_stream(query, history, system, params):
            pass
        return self.last_completion.text, self.last_history
