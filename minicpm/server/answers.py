"""Running one generation request on the engine client and answering it: :func:`answer`.

Contract: ``answer(build, request)`` submits every choice of every prompt (a prompt's first
choice at once, its others once that one's prompt is in the KV cache, so they share its blocks),
reads their outputs as they come, and answers in the shape ``build`` makes: :class:`ChatAnswer`
(``chat.completion`` and its chunks) or :class:`CompletionAnswer` (``text_completion``, with echo
and prompt scoring). The driver is the same for both; a shape differs only in the objects it
builds. However the HTTP request ends (finished, client gone, engine error, drain), its requests
still running are aborted, the server's in-flight count is given back, its metrics are recorded
and one access-log line is written, once.

* Non-streaming: the whole answer as JSON (built off the event loop); 499 when the client left;
  503 when the drain cut the answer; 500 with the engine's message when the engine failed.
* Streaming: the shape's opening frames, content deltas, a frame with ``finish_reason`` per
  choice, the usage frame when asked, an error frame (503) when the drain cut the answer or (500)
  when the engine failed, then ``data: [DONE]``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..engine.client import EngineError
from ..tokenizer import Tokenizer
from . import protocol as P
from .errors import APIError, error_type

if TYPE_CHECKING:
    from ..engine.client import EngineClient, OutputStream, RequestOutput, Sampled
    from .app import ServerState

log = logging.getLogger("minicpm.server")


# ---------------------------------------------------------------------------------------- choices
@dataclasses.dataclass
class _Choice:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[Sampled] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    queue_time: float | None = None
    prompt_logprobs: list[Sampled] | None = None


def _finish(reason: str | None) -> str | None:
    """OpenAI's finish reason; "abort" (as vLLM's) for an answer the server cut (its drain)."""
    return None if reason is None else reason if reason in ("length", "abort") else "stop"


def _cut_message(choices: list[_Choice]) -> str:
    tokens = sum(len(c.token_ids) for c in choices if c.finish_reason == "abort")
    return f"the server is shutting down: the answer was cut after {tokens} tokens, unfinished; send it again"


def _usage(choices: list[_Choice], prompt_counted: set[int]) -> P.Usage:
    prompt = sum(choices[i].prompt_tokens for i in prompt_counted)
    completion = sum(len(c.token_ids) for c in choices)
    cached = sum(choices[i].cached_tokens for i in prompt_counted)
    return P.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached),
    )


def _json_frame(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _token_text(tok: Tokenizer, token: int) -> str:
    return tok.decode([token])


def _chat_logprobs(tok: Tokenizer, items: list[Sampled]) -> P.ChatLogprobs:
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tok, token)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    content = [
        P.TokenLogprob(**entry(s.token_id, s.logprob), top_logprobs=[P.TopLogprob(**entry(t, v)) for t, v in s.top])
        for s in items
    ]
    return P.ChatLogprobs(content=content)


def _completion_logprobs(tok: Tokenizer, items: list[Sampled], offset: int) -> P.CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for s in items:
        text = _token_text(tok, s.token_id)
        tokens.append(text)
        values.append(max(s.logprob, -9999.0))
        tops.append({_token_text(tok, t): max(v, -9999.0) for t, v in s.top} if s.top else None)
        offsets.append(offset)
        offset += len(text)
    return P.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _echoed_logprobs(tok: Tokenizer, prompt: list[int], c: _Choice, echo: str) -> P.CompletionLogprobs:
    """The answer's logprobs; with echo, the prompt's first (its first token has none)."""
    answer = _completion_logprobs(tok, c.logprobs, len(echo))
    if not echo or c.prompt_logprobs is None:
        return answer
    scored = _completion_logprobs(tok, c.prompt_logprobs, len(_token_text(tok, prompt[0])))
    return P.CompletionLogprobs(
        tokens=[_token_text(tok, prompt[0]), *scored.tokens, *answer.tokens],
        token_logprobs=[None, *scored.token_logprobs, *answer.token_logprobs],
        top_logprobs=[None, *scored.top_logprobs, *answer.top_logprobs],
        text_offset=[0, *scored.text_offset, *answer.text_offset],
    )


# ---------------------------------------------------------------------------------------- shapes
class Answer(abc.ABC):
    """What a response shape shares: its request, prompts, choices and their bookkeeping."""

    prefix = ""

    def __init__(self, state: ServerState, body: P._Request, name: str, prompts: list[list[int]]) -> None:
        self.state, self.body, self.name, self.prompts = state, body, name, prompts
        self.tok = state.tokenizer
        self.logprobs = body.logprob_count()
        self.request_id = P.new_id(self.prefix)
        self.created = int(time.time())
        self.choices: list[_Choice] = []
        self.first_of_prompt = {p * body.n for p in range(len(prompts))}

    def grammar(self) -> str | None:
        return None

    def make_requests(self) -> list[tuple[int, Any]]:
        """Every choice of every prompt, validated (off the event loop): ``(choice index, request)``."""
        state, body, limit = self.state, self.body, self.state.max_model_len
        requests = []
        for p, ids in enumerate(self.prompts):
            if len(ids) >= limit:
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, your prompt "
                    f"contains {len(ids)} input tokens, which leaves no room for an answer.",
                    "input_tokens",
                )
            for i in range(body.n):
                try:
                    params = body.to_sampling_params(state.sampling_defaults, body.choice_seed(i), self.grammar())
                    requests.append((p * body.n + i, state.engine.make_request(ids, params)))
                except ValueError as exc:
                    raise APIError(400, str(exc)) from None
        return requests

    def take(self, index: int, out: RequestOutput) -> RequestOutput:
        """Add ``out`` to its choice (timing the tokens); what of it the client is sent."""
        c = self.choices[index]
        now = time.monotonic()
        metrics = self.state.metrics
        if out.token_ids:
            if c.first_token is None:
                c.first_token = now
                metrics.ttft.observe(now - self.start)
            elif c.last_token is not None:
                metrics.itl.observe((now - c.last_token) / len(out.token_ids))
            c.last_token = now
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        c.text += out.text
        c.token_ids += out.token_ids
        if out.logprobs:
            c.logprobs += out.logprobs
        if out.finished:
            c.finish_reason = out.finish_reason
            c.cached_tokens = out.cached_tokens
            c.queue_time = out.queue_time
        return out

    def usage(self) -> P.Usage:
        return _usage(self.choices, self.first_of_prompt)

    # what each shape builds
    @abc.abstractmethod
    def response(self) -> BaseModel:
        """The whole answer (not streamed)."""

    def opening(self) -> list[str]:
        """Frames a stream starts with."""
        return []

    @abc.abstractmethod
    def frames(self, index: int, out: RequestOutput) -> AsyncIterator[str]:
        """Frames of one output of choice ``index`` (an async generator)."""

    @abc.abstractmethod
    def finish_frame(self, index: int, reason: str | None) -> str:
        """The frame that ends choice ``index``."""

    @abc.abstractmethod
    def usage_frame(self) -> str:
        """The usage frame (``choices: []``)."""


class ChatAnswer(Answer):
    prefix = "chatcmpl"

    def __init__(
        self, state: ServerState, body: P.ChatCompletionRequest, name: str, ids: list[int], grammar: str | None
    ):
        super().__init__(state, body, name, [ids])
        self._grammar = grammar

    def grammar(self) -> str | None:
        return self._grammar

    def _logprobs(self, items: list[Sampled] | None) -> P.ChatLogprobs | None:
        return _chat_logprobs(self.tok, items) if items is not None and self.logprobs is not None else None

    def _chunk(self, choice: P.ChatChunkChoice | None, usage: P.Usage | None = None) -> str:
        choices = [choice] if choice is not None else []
        chunk = P.ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.name, choices=choices, usage=usage
        )
        return _json_frame(chunk)

    def response(self) -> P.ChatCompletion:
        return P.ChatCompletion(
            id=self.request_id,
            model=self.name,
            choices=[
                P.ChatChoice(
                    index=i,
                    message=P.AssistantMessage(content=c.text),
                    logprobs=self._logprobs(c.logprobs),
                    finish_reason=_finish(c.finish_reason),
                )
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(),
        )

    def opening(self) -> list[str]:
        role = P.Delta(role="assistant", content="")
        return [self._chunk(P.ChatChunkChoice(index=i, delta=role)) for i in range(len(self.choices))]

    async def frames(self, index: int, out: RequestOutput) -> AsyncIterator[str]:
        if out.text or (out.token_ids and self.logprobs is not None):
            delta = P.Delta(content=out.text)
            yield self._chunk(P.ChatChunkChoice(index=index, delta=delta, logprobs=self._logprobs(out.logprobs or [])))

    def finish_frame(self, index: int, reason: str | None) -> str:
        return self._chunk(P.ChatChunkChoice(index=index, delta=P.Delta(), finish_reason=_finish(reason)))

    def usage_frame(self) -> str:
        return self._chunk(None, self.usage())


class CompletionAnswer(Answer):
    prefix = "cmpl"

    def __init__(self, state: ServerState, body: P.CompletionRequest, name: str, prompts: list[list[int]]) -> None:
        super().__init__(state, body, name, prompts)
        self.score_only = body.answer_limit() == 0  # echo scoring the prompt: the generated token is dropped
        count = len(prompts) * body.n
        self.echo_text = [self.tok.decode(self._prompt(i)) if body.echo else "" for i in range(count)]
        self._echoed: set[int] = set()

    def take(self, index: int, out: RequestOutput) -> RequestOutput:
        if self.score_only:
            out = dataclasses.replace(out, text="", token_ids=[], logprobs=[])
        return super().take(index, out)

    def _prompt(self, index: int) -> list[int]:
        return self.prompts[index // self.body.n]

    def _frame(self, choice: P.CompletionChoice | None, usage: P.Usage | None = None) -> str:
        choices = [choice] if choice is not None else []
        return _json_frame(
            P.Completion(id=self.request_id, created=self.created, model=self.name, choices=choices, usage=usage)
        )

    def response(self) -> P.Completion:
        echo = self.echo_text
        return P.Completion(
            id=self.request_id,
            model=self.name,
            choices=[
                P.CompletionChoice(
                    index=i,
                    text=echo[i] + c.text,
                    logprobs=_echoed_logprobs(self.tok, self._prompt(i), c, echo[i])
                    if self.logprobs is not None
                    else None,
                    finish_reason=_finish(c.finish_reason),
                )
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage(),
        )

    def _echo_frame(self, index: int) -> str:
        scored = _Choice(prompt_logprobs=self.choices[index].prompt_logprobs)
        echo = self.echo_text[index]
        lp = _echoed_logprobs(self.tok, self._prompt(index), scored, echo) if self.logprobs is not None else None
        return self._frame(P.CompletionChoice(index=index, text=echo, logprobs=lp, finish_reason=None))

    async def frames(self, index: int, out: RequestOutput) -> AsyncIterator[str]:
        if self.body.echo and index not in self._echoed:  # the prompt (and its logprobs) first
            self._echoed.add(index)
            yield await asyncio.to_thread(self._echo_frame, index)  # a whole context of entries: off the loop
        if out.text or (out.token_ids and self.logprobs is not None):
            offset = len(self.echo_text[index]) + len(self.choices[index].text) - len(out.text)
            items = out.logprobs or []
            lp = _completion_logprobs(self.tok, items, offset) if self.logprobs is not None else None
            yield self._frame(P.CompletionChoice(index=index, text=out.text, logprobs=lp, finish_reason=None))

    def finish_frame(self, index: int, reason: str | None) -> str:
        return self._frame(P.CompletionChoice(index=index, text="", logprobs=None, finish_reason=_finish(reason)))

    def usage_frame(self) -> str:
        return self._frame(None, self.usage())


# ---------------------------------------------------------------------------------------- driver
async def answer(build: Answer, request: Request) -> Any:
    """Run ``build``'s requests on the engine and answer in its shape (see the module's contract)."""
    state = build.state
    if state.draining:
        raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
    capacity = state.engine.limits().max_num_seqs + state.max_queued_requests
    made = await asyncio.to_thread(build.make_requests)
    if state.in_flight + len(made) > capacity:
        raise APIError(
            503, "The engine is currently busy (the queue is full); try again.", headers={"Retry-After": "1"}
        )
    build.start = time.monotonic()
    streams = _submit(state.engine, made, build.body.n)
    state.in_flight += len(streams)
    build.choices = [_Choice(prompt_tokens=r.seq.num_prompt_tokens) for _, r in made]
    done = _Once(lambda: _close(build, streams))
    if not build.body.stream:
        return await _whole(build, streams, request, done)
    return _GuardedStream(
        _events(build, streams, done), done, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _submit(engine: EngineClient, made: list[tuple[int, Any]], n: int) -> list[tuple[int, Any]]:
    loop = asyncio.get_running_loop()
    streams: list[tuple[int, Any]] = []
    for index, r in made:
        if index % n == 0:  # the first choice of a prompt goes now
            leader = _Leader(engine.submit(r, loop))
            streams.append((index, leader))
        else:  # the others once its prompt is in the KV cache, so they share its blocks
            streams.append((index, _Follower(engine, r, loop, leader.prefilled)))
    return streams


class _Once:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn, self.done = fn, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.fn()


def _close(build: Answer, streams: list[tuple[int, Any]]) -> None:
    """Once per HTTP request, however it ends: abort what is still running, count, log."""
    state, choices = build.state, build.choices
    for _, s in streams:
        s.cancel()
    state.in_flight -= len(streams)
    end = time.monotonic()
    for i, c in enumerate(choices):
        state.metrics.finished(c, end - build.start, counted_prompt=i in build.first_of_prompt)
    first = choices[0]
    ttft = f"{first.first_token - build.start:.3f}s" if first.first_token else "-"
    usage = build.usage()
    log.info(
        "%s prompt=%d completion=%d cached=%d ttft=%s total=%.3fs finish=%s",
        build.request_id,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.prompt_tokens_details.cached_tokens,
        ttft,
        end - build.start,
        ",".join(str(c.finish_reason) for c in choices),
    )


async def _whole(build: Answer, streams: list[tuple[int, Any]], request: Request, done: _Once) -> Response:
    try:
        finished = await _until_disconnect(request, _collect(streams, build.take))
    except EngineError as exc:
        raise APIError(500, str(exc)) from None
    finally:
        done()
    if not finished:
        return JSONResponse({}, status_code=499)  # nobody is listening
    if any(c.finish_reason == "abort" for c in build.choices):  # cut by the drain: not an answer
        raise APIError(503, _cut_message(build.choices), headers={"Retry-After": "5"})
    # built and serialized off the event loop: an echoed prompt's logprobs can be a whole context of entries
    return await asyncio.to_thread(lambda: Response(build.response().model_dump_json(), media_type="application/json"))


async def _events(build: Answer, streams: list[tuple[int, Any]], done: _Once) -> AsyncIterator[str]:
    body = build.body
    try:
        for frame in build.opening():
            yield frame
        async for index, raw in _merged(streams):
            out = build.take(index, raw)
            async for frame in build.frames(index, out):
                yield frame
            if out.finished:
                yield build.finish_frame(index, out.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            yield build.usage_frame()
        if any(c.finish_reason == "abort" for c in build.choices):  # cut by the drain: say so, not just "abort"
            cut = P.ErrorInfo(message=_cut_message(build.choices), type=error_type(503), code=503)
            yield _json_frame(P.ErrorResponse(error=cut))
    except EngineError as exc:
        yield _json_frame(P.ErrorResponse(error=P.ErrorInfo(message=str(exc), type="server_error", code=500)))
    finally:
        done()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------- streams
class _Leader:
    """The first choice of a prompt; ``prefilled`` is set once its prompt has been computed (its
    first output) or it ended."""

    def __init__(self, stream: OutputStream) -> None:
        self.stream = stream
        self.prefilled = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.stream:
                self.prefilled.set()
                yield out
        finally:
            self.prefilled.set()

    def cancel(self) -> None:
        self.stream.cancel()


class _Follower:
    """Another choice of the same prompt, submitted after the leader's prefill: its full prompt
    blocks are then prefix-cache hits (``n`` choices share the prompt's KV blocks)."""

    def __init__(self, engine: EngineClient, request: Any, loop: asyncio.AbstractEventLoop, ready: asyncio.Event):
        self.engine, self.request, self.loop, self.ready = engine, request, loop, ready
        self.stream: OutputStream | None = None
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        await self.ready.wait()
        if self.cancelled:
            return
        self.stream = self.engine.submit(self.request, self.loop)
        async for out in self.stream:
            yield out

    def cancel(self) -> None:
        self.cancelled = True
        if self.stream is not None:
            self.stream.cancel()


async def _merged(streams: list[tuple[int, Any]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with their choice index."""
    if len(streams) == 1:
        index, stream = streams[0]
        async for out in stream:
            yield index, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: Any) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
        except BaseException as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        for _, s in streams:  # a reader that leaves aborts what is left
            s.cancel()


class _GuardedStream(StreamingResponse):
    """A stream whose cleanup runs even if the client left before its body was ever iterated
    (Starlette then cancels the response without starting the generator)."""

    def __init__(self, content: Any, cleanup: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


async def _collect(streams: list[tuple[int, Any]], take: Callable[[int, RequestOutput], Any]) -> bool:
    async for index, out in _merged(streams):
        take(index, out)
    return True


async def _until_disconnect(request: Request, work: Any) -> bool:
    """Run ``work``; if the client disconnects first, cancel it (its requests are aborted)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
