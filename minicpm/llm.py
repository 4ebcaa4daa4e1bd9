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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .engine import Completion, EngineConfig, LLMEngine, RequestOutput
from .model import MiniCPMForCausalLM
from .sampling import SamplingParams
from .tokenizer import Tokenizer

# The card's example call: model.chat(tokenizer, query, temperature=0.8, top_p=0.8)
CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_p": 0.8, "max_new_tokens": 1024}


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
        self._pending: dict[str, list[RequestOutput]] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        chat_format: str = "auto",
        engine_config: EngineConfig | None = None,
    ) -> LLM:
        if path is None:
            from .default_model import default_model_path

            path = default_model_path()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = MiniCPMForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        return cls(model, Tokenizer.from_pretrained(path), chat_format=chat_format, engine_config=engine_config)

    @property
    def config(self):
        return self.model.config

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        return self.engine.stop_token_ids(params)

    # ------------------------------------------------------------------ generation
    def _outputs(self, request_id: str) -> Iterator[RequestOutput]:
        """Step the engine until ``request_id`` finishes, yielding its outputs (others' are kept)."""
        engine, pending = self.engine, self._pending
        pending.setdefault(request_id, [])
        try:
            if not pending[request_id] and request_id not in engine.requests:
                return
            while True:
                while pending[request_id]:
                    out = pending[request_id].pop(0)
                    yield out
                    if out.finished:
                        return
                for out in engine.step():
                    if out.request_id in pending:
                        pending[out.request_id].append(out)
        finally:
            pending.pop(request_id, None)
            if request_id in engine.requests:  # the caller stopped early
                engine.abort_request(request_id)

    def _run(self, prompt: str | Sequence[int], params: SamplingParams, state: Completion) -> Iterator[str]:
        request = self.engine.make_request(prompt, params)
        state.prompt_tokens = request.seq.num_prompt_tokens
        self.engine.add(request)
        for out in self._outputs(request.request_id):
            state.add(out)
            if out.text:
                yield out.text

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kwargs: Any) -> Iterator[str]:
        """Text deltas of a completion of ``prompt`` (a string, or token ids)."""
        params = params or SamplingParams(**kwargs)
        yield from self._run(prompt, params, Completion("", [], 0, "length"))

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
        requests = [self.engine.make_request(p, params) for p in prompt]  # all validated before any runs
        states = [Completion("", [], r.seq.num_prompt_tokens, "length") for r in requests]
        for r in requests:
            self.engine.add(r)
            self._pending[r.request_id] = []
        try:
            for r, state in zip(requests, states, strict=True):
                for out in self._outputs(r.request_id):
                    state.add(out)
        finally:
            for r in requests:
                self._pending.pop(r.request_id, None)
                if r.request_id in self.engine.requests:
                    self.engine.abort_request(r.request_id)
        return states

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ready for the answer."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_format=self.chat_format)
        bos = self.tokenizer.special_tokens.get("bos_token")
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

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
    ) -> Iterator[str]:
        """Deltas of the answer; then ``self.last_history`` and ``self.last_completion`` hold the turn."""
        messages = self.chat_messages(query, history, system)
        params = params or SamplingParams(**CHAT_DEFAULTS)
        state = Completion("", [], 0, "length")
        yield from self._run(self.chat_prompt(messages), params, state)
        self.last_completion = state
        self.last_history = [*messages, {"role": "assistant", "content": state.text}]

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
