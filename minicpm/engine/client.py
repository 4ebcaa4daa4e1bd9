"""What a front end (the HTTP server, :class:`~minicpm.LLM`) needs from an engine: :class:`EngineClient`.

Contract: a front end sees an engine only through this protocol and never reaches into the
engine's parts. :class:`~minicpm.engine.async_engine.BackgroundEngine` implements it.

* ``make_request(prompt, params)`` validates and tokenizes in the caller's thread (bad input
  raises ``ValueError`` naming the problem; nothing is queued) and returns a request to submit.
* ``submit(request, loop=None)`` queues it and returns its :class:`OutputStream`: the request's
  :class:`~minicpm.engine.llm_engine.RequestOutput`\\ s, read with ``async for`` from ``loop`` or,
  without a loop, with ``for`` from any thread, until the one with ``finished`` set. A reader that
  stops early, or drops the stream, aborts the request; ``cancel()`` does the same explicitly.
  A failure of the engine reaches the stream as an :class:`EngineError`.
* ``abort(request_id)`` ends a request; its stream ends with ``finish_reason == "abort"``.
* ``limits()`` the sizes a front end checks requests against (:class:`EngineLimits`).
* ``check_grammar(grammar)`` None if the engine can run ``grammar`` (a structured-output grammar),
  else why not.
* ``stats()`` the engine's counters (for ``/metrics``), as of its last step.
* ``alive`` whether new requests are accepted; ``close()`` stops this client (its requests are
  aborted).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..sampling import SamplingParams
    from .llm_engine import Request, RequestOutput
    from .sampler import Sampled

__all__ = ["EngineClient", "EngineError", "EngineLimits", "OutputStream", "RequestOutput", "Sampled"]


class EngineError(RuntimeError):
    """The engine failed while running this request."""


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    max_model_len: int  # prompt plus answer, in tokens, for one sequence
    vocab_size: int  # token ids are in [0, vocab_size)
    max_num_seqs: int  # requests the engine runs at once (more wait in its queue)


class OutputStream(Protocol):
    request_id: str
    finished: bool

    def cancel(self) -> None: ...

    def __iter__(self) -> Iterator[RequestOutput]: ...

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...


@runtime_checkable
class EngineClient(Protocol):
    @property
    def alive(self) -> bool: ...

    def limits(self) -> EngineLimits: ...

    def make_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request: ...

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> OutputStream: ...

    def abort(self, request_id: str) -> None: ...

    def check_grammar(self, grammar: str) -> str | None: ...

    def stats(self) -> dict[str, int | float | str]: ...

    def close(self) -> None: ...
