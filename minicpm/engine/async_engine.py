"""An :class:`~minicpm.engine.LLMEngine` in its own thread, behind :class:`BackgroundEngine` clients.

Contract: an engine has at most one request router at a time: one daemon thread that owns the
engine and runs ``step()`` while any request is in flight (it sleeps otherwise).
``BackgroundEngine(engine)`` is a client of that router (it starts one if the engine has none),
implementing :class:`~minicpm.engine.client.EngineClient`; any number of clients (an
:class:`~minicpm.LLM`, a server over the same engine) share the router, its batches and its KV
cache. Abort, a dropped stream and failure fan-out are handled here once, for all of them. From
any thread:

* ``add_request(prompt, params, request_id=None)`` validates and tokenizes in the caller's thread
  (bad input raises ``ValueError`` there, and nothing is queued) and returns a
  :class:`RequestStream`: iterate it for the request's :class:`~minicpm.engine.RequestOutput`\\ s
  until the one with ``finished`` set; a reader that stops early (``break``, ``close()``, the
  stream garbage-collected, even before it was first read) aborts the request: the router holds
  streams by weak reference only.
* ``abort(request_id)`` ends a request; its stream ends with ``finish_reason == "abort"``.
* ``async for out in client.generate(prompt, params)`` does the same from an asyncio loop;
  leaving the loop early (a client that disconnects, a cancelled task) aborts the request.
* ``close()`` aborts this client's requests and refuses new ones; the router stops (and its
  thread ends) once its last client is closed or garbage-collected.

If a step raises (a bug, a device error), every request then in flight, whichever client sent it,
gets the exception from its stream, is aborted (its blocks are freed), and the router keeps
serving new requests. A request that alone fails while its token is finished (``finish_reason``
"error") gets an :class:`EngineError` from its stream; the others go on. If the router thread
itself dies, every open stream gets the error (none waits forever) and new requests are refused.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Sequence as Seq
from typing import ClassVar, Protocol

from ..sampling import SamplingParams
from .client import EngineError, EngineLimits
from .cpu_kernels import release_openmp_threads
from .llm_engine import LLMEngine, Request, RequestOutput

__all__ = ["BackgroundEngine", "EngineError", "RequestStream"]

log = logging.getLogger("minicpm.engine")


class Cancel(Protocol):
    def is_set(self) -> bool: ...


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
        """Called by the router thread; False when the reader's loop is gone."""
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

    def until(self, cancel: Cancel | None, poll: float = 0.02) -> Iterator[RequestOutput]:
        """The outputs, read from a thread; once ``cancel`` is set the request is aborted (its last
        output says "abort"). A reader that stops early aborts the request and, unless it is the
        router's own thread (a garbage-collected stream), waits until the abort has freed its blocks."""
        try:
            while not self.finished:
                if cancel is None:
                    item = self._queue.get()
                else:
                    if cancel.is_set():  # checked before every read: outputs may never pause for poll
                        self.cancel()
                    try:
                        item = self._queue.get(timeout=poll)
                    except queue.Empty:
                        continue
                yield self._take(item)
        finally:
            if not self.finished:
                self.cancel()
                if threading.current_thread().name != _Router.THREAD_NAME:
                    with contextlib.suppress(EngineError):
                        while not self.finished:
                            self._take(self._queue.get())

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                yield self._take(await self._queue.get())
        finally:
            self.cancel()


class _Router:
    """The one thread that owns an engine: it takes the clients' commands and steps the engine."""

    THREAD_NAME = "minicpm-engine"
    _registry: ClassVar[dict[int, _Router]] = {}  # id(engine) -> its live router (a router holds its engine)
    _registry_lock = threading.Lock()

    @classmethod
    def attach(cls, engine: LLMEngine) -> _Router:
        """The engine's router, started if it has none; one more client counted on it."""
        with cls._registry_lock:
            router = cls._registry.get(id(engine))
            if router is None or router.engine is not engine or not router._accepting:
                router = cls(engine)
                cls._registry[id(engine)] = router
            router._clients += 1
            return router

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, weakref.ref[RequestStream]] = {}  # weak: a dropped stream aborts
        self._owners: dict[str, int] = {}  # request id -> the client that sent it
        self._clients = 0
        self._accepting = True
        self._died: str | None = None  # why the thread ended ("died: ...", "was closed"), once it has
        self._lock = threading.Lock()  # submit vs stop: an accepted request is always read
        self.stats: dict[str, int | float | str] = engine.stats()
        self._thread = threading.Thread(target=self._loop, name=self.THREAD_NAME, daemon=True)
        if threading.current_thread().name != self.THREAD_NAME:
            # the engine's kernels run on the router's thread from now on: this thread (which loaded
            # the model) gives back its OpenMP workers, or both pools would sleep between regions
            release_openmp_threads()
        _THREADS.difference_update([t for t in _THREADS if not t.is_alive()])  # those wholly ended
        _THREADS.add(self._thread)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._died is None

    def submit(self, client: int, request: Request, loop: asyncio.AbstractEventLoop | None) -> RequestStream:
        with self._lock:  # a command put here is read by the thread, or by its drain when it ends
            if self._died is not None:
                raise EngineError(f"the engine thread {self._died}")
            stream = RequestStream(request.request_id, loop, self.abort)
            self._commands.put(("add", (client, request), stream))
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def detach(self, client: int, done: threading.Event | None) -> None:
        """Abort ``client``'s requests; the router stops once no client is left."""
        with type(self)._registry_lock:
            self._clients -= 1
            last = self._clients == 0
            if last:
                self._accepting = False
                if type(self)._registry.get(id(self.engine)) is self:
                    del type(self)._registry[id(self.engine)]
        self._commands.put(("detach", (client, last), done))

    def join(self, timeout: float | None = None) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the router's thread
    def _deliver(self, out: RequestOutput | BaseException, request_id: str) -> None:
        ref = self._streams.get(request_id)
        if ref is None:
            return
        if isinstance(out, BaseException) or out.finished:
            del self._streams[request_id]
            self._owners.pop(request_id, None)
        if isinstance(out, RequestOutput) and out.finish_reason == "error":
            out = EngineError(f"the request failed: {out.error}")
        stream = ref()
        if stream is None or not stream.put(out):  # dropped unread, or its event loop is gone
            self._streams.pop(request_id, None)
            self._owners.pop(request_id, None)
            if request_id in self.engine.requests:
                self.engine.abort_request(request_id)

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort_request(request_id)
        if out is not None:
            self._deliver(out, request_id)

    def _handle(self, command: str, arg: object, extra: object) -> bool:
        if command == "add":
            client, request = arg
            try:
                self.engine.add(request)
            except ValueError as e:  # a duplicate request id
                extra.put(e)
                return True
            self._streams[request.request_id] = weakref.ref(extra)
            self._owners[request.request_id] = client
        elif command == "abort":
            self._abort(arg)
        elif command == "detach":
            client, last = arg
            for request_id in [r for r, c in self._owners.items() if c == client or last]:
                self._abort(request_id)
            if last:
                for request_id in list(self.engine.requests):  # e.g. streams already dropped
                    self._abort(request_id)
            self.stats = self.engine.stats()
            if extra is not None:
                extra.set()
            return not last
        return True

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the thread is ending on an error: no open stream may wait forever
            log.exception("the engine thread died")
            with self._lock:
                self._died = f"died: {type(exc).__name__}: {exc}"
            error = EngineError(f"the engine thread {self._died}")
            for ref in list(self._streams.values()):
                stream = ref()
                if stream is not None:
                    stream.put(error)
            self._streams.clear()
        else:  # its last client left
            with self._lock:
                self._died = "was closed"
            error = EngineError("the engine was closed before this request ran")
        while True:  # commands sent before _died was set: refuse their streams, release closers
            try:
                command, _, extra = self._commands.get_nowait()
            except queue.Empty:
                break
            if command == "add":
                extra.put(error)
            elif command == "detach" and extra is not None:
                extra.set()

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
                self.stats = engine.stats()  # e.g. the last request was just aborted
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
            self.stats = engine.stats()
            for out in outputs:
                self._deliver(out, out.request_id)


_client_ids = itertools.count(1)
# every router thread until it has wholly ended (a router may be collected while its thread, done
# with it, is still tearing down)
_THREADS: set[threading.Thread] = set()


@atexit.register
def _stop_routers(timeout: float = 30.0) -> None:
    """At interpreter exit, every router still serving clients ends its requests and every router thread is
    joined. The threads are daemons (a forgotten LLM must not keep a process alive), but one still
    stepping, or ending, while the interpreter finalizes races torch's own teardown (an abort:
    "terminate called without an active exception")."""
    with _Router._registry_lock:  # a router out of the registry has its last detach queued already
        running = list(_Router._registry.values())
    for router in running:
        router._commands.put(("detach", (0, True), None))
    for thread in list(_THREADS):
        if thread is not threading.current_thread():
            thread.join(timeout)


class BackgroundEngine:
    """A client of ``engine``'s request router (:class:`~minicpm.engine.client.EngineClient`)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._id = next(_client_ids)
        self._closed = False
        self._router = _Router.attach(engine)

    # ------------------------------------------------------------------ EngineClient
    @property
    def alive(self) -> bool:
        return not self._closed and self._router.alive

    def limits(self) -> EngineLimits:
        engine = self.engine
        return EngineLimits(engine.max_model_len, engine.model_config.vocab_size, engine.config.max_num_seqs)

    def make_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and tokenize (in the caller's thread): ``ValueError`` names what is wrong."""
        return self.engine.make_request(prompt, params, request_id)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Queue a request made (validated, tokenized) with :meth:`make_request`, e.g. in a worker
        thread; read its stream from ``loop`` (asyncio) or, without one, from any thread."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        return self._router.submit(self._id, request, loop)

    def abort(self, request_id: str) -> None:
        self._router.abort(request_id)

    def check_grammar(self, grammar: str) -> str | None:
        """Why the engine cannot run ``grammar`` (structured output), or None; any thread."""
        return self.engine.runner.sampler.check_grammar(grammar)

    def stats(self) -> dict[str, int | float | str]:
        """The engine's counters as of its last step."""
        return dict(self._router.stats)

    def close(self) -> None:
        """Abort this client's requests (waiting until they are) and refuse new ones."""
        if self._closed:
            return
        self._closed = True
        done = threading.Event()
        self._router.detach(self._id, done)
        if threading.current_thread().name != _Router.THREAD_NAME:
            while not done.wait(0.1) and self._router.alive:  # a dead router reads no command
                pass

    # ------------------------------------------------------------------ conveniences
    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> RequestStream:
        return self.submit(self.make_request(prompt, params, request_id))

    async def generate(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        stream = self.submit(self.make_request(prompt, params, request_id), asyncio.get_running_loop())
        async for out in stream:
            yield out

    def __del__(self) -> None:  # a client dropped unclosed: its requests end, the router may stop
        if not getattr(self, "_closed", True):
            self._closed = True
            with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
                self._router.detach(self._id, None)

    def __enter__(self) -> BackgroundEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
