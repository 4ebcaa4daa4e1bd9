"""High-level generation and chat: :class:`LLM`.

Contract:

* ``LLM.from_pretrained(path=None)`` loads a checkpoint directory's model and tokenizer; without
  a path, the embedded default model (:mod:`minicpm.default_model`).
* ``generate(prompt, params)`` returns a :class:`Completion`; ``stream(prompt, params)`` yields
  text deltas whose concatenation is the completion's text. The prompt's KV is computed once;
  each step feeds only the new token. Generation stops at the stop ids (the config's and the
  tokenizer's eos and, for ChatML vocabularies, ``<|im_end|>``; ``ignore_eos`` drops these), at a
  stop string (the text ends before it; nothing after it is produced) or after
  ``max_new_tokens``. A prompt that leaves no room in the model's context is refused with a
  ``ValueError`` that gives both lengths.
* ``chat(query, history=None, system=None, ...)`` returns ``(response, history)`` like the card's
  ``model.chat``, without its defects: it stops at ``<|im_end|>``, keeps every generated token,
  never returns template markers, and ``max_new_tokens`` counts only the answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .model import DenseKVCache, MiniCPMForCausalLM
from .sampling import SamplingParams, sample_next
from .tokenizer import IncrementalDecoder, Tokenizer

# The card's example call: model.chat(tokenizer, query, temperature=0.8, top_p=0.8)
CHAT_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_p": 0.8, "max_new_tokens": 1024}


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (stop id or string) or "length"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class LLM:
    """A model and its tokenizer, ready to complete and chat."""

    def __init__(self, model: MiniCPMForCausalLM, tokenizer: Tokenizer, chat_format: str = "auto") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        tokenizer.resolve_chat_template(chat_format)  # fail now on an unknown format

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        chat_format: str = "auto",
    ) -> LLM:
        if path is None:
            from .default_model import default_model_path

            path = default_model_path()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = MiniCPMForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        return cls(model, Tokenizer.from_pretrained(path), chat_format=chat_format)

    @property
    def config(self):
        return self.model.config

    def stop_token_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(self.config.eos_token_ids)
            for token in (self.tokenizer.eos_token_id, self.tokenizer.token_to_id("<|im_end|>")):
                if token is not None:
                    ids.add(token)
        return ids

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        context = self.config.context_length
        if len(ids) >= context:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; the model's context is {context} tokens, "
                "which leaves no room for an answer"
            )
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {self.config.vocab_size})")
        return ids

    # ------------------------------------------------------------------ generation
    def _run(self, prompt_ids: list[int], params: SamplingParams, state: Completion) -> Iterator[str]:
        """The decode loop; yields text deltas and fills ``state`` as it goes."""
        model, device = self.model, self.model.device
        max_new = min(params.max_new_tokens, self.config.context_length - len(prompt_ids))
        stop_ids = self.stop_token_ids(params)
        generator = params.make_generator(device)
        cache = DenseKVCache(self.config, 1, len(prompt_ids) + max_new, dtype=model.dtype, device=device)
        seen = torch.tensor(prompt_ids, device=device)
        decoder = IncrementalDecoder(self.tokenizer)
        text, emitted, cut_at_stop_string = "", 0, False
        step_input = seen[None]
        with torch.inference_mode():
            for _ in range(max_new):
                logits = model(step_input, cache=cache, rope_lengths=len(prompt_ids))[0, -1]
                token = sample_next(logits, params, seen, generator)
                if token in stop_ids:
                    state.finish_reason = "stop"
                    break
                state.token_ids.append(token)
                text += decoder.push(token)
                cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
                if cut >= 0:
                    state.finish_reason, text, cut_at_stop_string = "stop", text[:cut], True
                    break
                safe = len(text) - _held_back(text, params.stop)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                seen = torch.cat([seen, seen.new_tensor([token])])
                step_input = seen[None, -1:]
            else:
                state.finish_reason = "length"
        if not cut_at_stop_string:
            text += decoder.flush()
        if len(text) > emitted:
            yield text[emitted:]
        state.text = text

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kwargs: Any) -> Iterator[str]:
        """Text deltas of a completion of ``prompt`` (a string, or token ids)."""
        params = params or SamplingParams(**kwargs)
        ids = self._prompt_ids(prompt)
        yield from self._run(ids, params, Completion("", [], len(ids), "length"))

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kwargs: Any) -> Completion:
        """Complete ``prompt``; keyword arguments build the :class:`SamplingParams`."""
        params = params or SamplingParams(**kwargs)
        ids = self._prompt_ids(prompt)
        state = Completion("", [], len(ids), "length")
        for _ in self._run(ids, params, state):
            pass
        return state

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
        ids = self._prompt_ids(self.chat_prompt(messages))
        state = Completion("", [], len(ids), "length")
        yield from self._run(ids, params, state)
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
