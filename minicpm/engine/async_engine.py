"""An :class:`~minicpm.engine.LLMEngine` in its own thread: :class:`BackgroundEngine`.

Contract: one daemon thread owns the engine and runs ``step()`` while any request is in flight
(it sleeps otherwise). From any thread:

* ``add_request(prompt, params, request_id=None)`` validates and tokenizes in the caller's thread
  (bad input raises ``ValueError`` there, and nothing is queued) and returns a
  :class:`RequestStream`: iterate it for the request's :class:`~minicpm.engine.RequestOutput`\\ s
  until the one with ``finished`` set; a reader that stops early (``break``, ``close()``, the
  stream garbage-collected, even before it was first read) aborts the request: the engine holds
  streams by weak reference only.
* ``abort(request_id)`` ends a request; its stream ends with ``finish_reason == "abort"``.
* ``async for out in engine.generate(prompt, params)`` does the same from an asyncio loop; leaving
  the loop early (a client that disconnects, a cancelled task) aborts the request.
* ``close()`` aborts everything and stops the thread.

If a step raises (a bug, a device error), every request then in flight gets the exception from
its stream, is aborted (its blocks are freed), and the engine keeps serving new requests. A
request that alone fails while its token is finished (``finish_reason`` "error") gets an
:class:`EngineError` from its stream; the others go on. If the engine thread itself dies, every
open stream gets the error (none waits forever) and new requests are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Sequence as Seq

from ..sampling import SamplingParams
from .llm_engine import LLMEngine, Request, RequestOutput

log = logging.getLogger("minicpm.engine")


class EngineError(RuntimeError):
    """The engine failed while running this request."""


class RequestStream:
    """The outputs of one request, readable from a thread (iteration) or an asyncio loop (``async for``)."""

    def __init__(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop | None = None,
        abort: Callable[[str], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self.finished = False
        self._cancelled = False
        self._abort = abort
        self._loop = loop
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Called by the engine thread; False when the reader's loop is gone."""
        if self._loop is None:
            self._queue.put(item)
            return True
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop was closed
            return False
        return True

    def _take(self, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def cancel(self) -> None:
        """Abort the request unless it has finished (the reader left)."""
        if not self.finished and not self._cancelled and self._abort is not None:
            self._cancelled = True  # once; the stream can still be read to its "abort" output
            self._abort(self.request_id)

    def __del__(self) -> None:  # dropped unread (or half read): the request is aborted
        with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
            self.cancel()

    def __iter__(self) -> Iterator[RequestOutput]:
        try:
            while not self.finished:
                yield self._take(self._queue.get())
        finally:  # the reader stopped (break, close, garbage collection): the request is aborted
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                yield self._take(await self._queue.get())
        finally:
            self.cancel()


class BackgroundEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, weakref.ref[RequestStream]] = {}  # weak: a dropped stream aborts
        self._closed = False
        self._died: str | None = None  # why the engine thread ended, if it did not close
        self._lock = threading.Lock()  # submit vs close: an accepted request is always read
        self._stats: dict[str, int] = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="minicpm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side
    def _submit(self, request: Request, loop: asyncio.AbstractEventLoop | None) -> RequestStream:
        with self._lock:
            if self._died is not None:
                raise EngineError(f"the engine thread died: {self._died}")
            if self._closed:
                raise RuntimeError("the engine is closed")
            stream = RequestStream(request.request_id, loop, self.abort)
            self._commands.put(("add", request, stream))
        return stream

    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestStream:
        return self._submit(self.engine.make_request(prompt, params, request_id), None)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Queue a request made (validated, tokenized) with ``engine.make_request``, e.g. in a worker
        thread; read its stream from ``loop`` (asyncio) or, without one, from any thread."""
        return self._submit(request, loop)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    async def generate(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        stream = self._submit(self.engine.make_request(prompt, params, request_id), asyncio.get_running_loop())
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def stats(self) -> dict[str, int]:
        """The engine's counters as of its last step."""
        return dict(self._stats)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(("close", None, None))
        self._thread.join()

    def __enter__(self) -> BackgroundEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        ref = self._streams.get(request_id)
        if ref is None:
            return
        if isinstance(out, BaseException) or out.finished:
            del self._streams[request_id]
        if isinstance(out, RequestOutput) and out.finish_reason == "error":
            out = EngineError(f"the request failed: {out.error}")
        stream = ref()
        if stream is None or not stream.put(out):  # dropped unread, or its event loop is gone
            self._streams.pop(request_id, None)
            if request_id in self.engine.requests:
                self.engine.abort_request(request_id)

    def _handle(self, command: str, arg: object, stream: RequestStream | None) -> bool:
        engine = self.engine
        if command == "add":
            try:
                engine.add(arg)
            except ValueError as e:  # a duplicate request id
                stream.put(e)
                return True
            self._streams[arg.request_id] = weakref.ref(stream)
        elif command == "abort":
            out = engine.abort_request(arg)
            if out is not None:
                self._deliver(out, arg)
        elif command == "close":
            for request_id in list(engine.requests):
                self._deliver(engine.abort_request(request_id), request_id)
            return False
        return True

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the thread is ending on an error: no open stream may wait forever
            log.exception("the engine thread died")
            with self._lock:
                self._died = f"{type(exc).__name__}: {exc}"
            error = EngineError(f"the engine thread died: {self._died}")
            for ref in list(self._streams.values()):
                stream = ref()
                if stream is not None:
                    stream.put(error)
            self._streams.clear()
            while True:  # commands sent before _died was set: refuse their streams too
                try:
                    command, _, stream = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command == "add" and stream is not None:
                    stream.put(error)

    def _serve(self) -> None:
        engine = self.engine
        while True:
            try:
                command = self._commands.get(block=not engine.has_unfinished_requests())
            except queue.Empty:
                command = None
            while command is not None:
                if not self._handle(*command):
                    return
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not engine.has_unfinished_requests():
                self._stats = engine.stats()  # e.g. the last request was just aborted
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # reported to every request in flight
                log.exception("engine step failed")
                error = EngineError(f"the engine failed: {type(e).__name__}: {e}")
                error.__cause__ = e
                for request_id in list(engine.requests):
                    engine.abort_request(request_id)
                # every open stream, including any whose last output was lost with the step
                for request_id in list(self._streams):
                    self._deliver(error, request_id)
                continue
            self._stats = engine.stats()
            for out in outputs:
                self._deliver(out, out.request_id)
