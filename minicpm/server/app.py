"""The OpenAI-compatible HTTP API over one :class:`~minicpm.engine.async_engine.BackgroundEngine`.

Contract (``build_app(state)``):

* ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events or
  not), ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``, ``GET /health``, ``GET
  /version``, ``GET /metrics``. Requests from every client share the engine's batches.
* Errors always use OpenAI's nested envelope ``{"error": {"message", "type", "param", "code"}}``:
  400 for malformed JSON, wrong types, out-of-range or non-finite values, a chat ``max_tokens`` of
  0, a ``json_schema`` no output can satisfy, and prompts that alone fill the context
  (``max_tokens`` beyond the room left is clamped, as vLLM does); 401 for a missing or wrong key
  (compared in constant time) on every route but ``/health``, ``/metrics``, ``/version``; 404 for
  an unknown model or route; 413 for a body over ``max_request_bytes``, unparsed; 503 with
  ``Retry-After`` when the queue is full or the server is draining. A client's mistake is never a
  5xx and never a ``server_error``.
* Nothing a request sends can stall the event loop: an oversized body is refused unread, a text
  prompt that cannot fit is refused from its length in characters before it is tokenized,
  tokenizing and building large responses run in worker threads. A client that disconnects,
  streaming or not, aborts its requests at once (their KV blocks are freed).
* A generated end-of-sequence (or stop) token is a generated token: counted in
  ``completion_tokens`` and present in ``logprobs``, its text left out of the answer (as vLLM).
* A stream sends a role chunk per choice, content deltas, a chunk with ``finish_reason``, the
  usage chunk (``choices: []``) when ``stream_options.include_usage``, then ``data: [DONE]``; an
  error before the first token is a plain HTTP error, one after it an error frame before
  ``[DONE]``. An answer the server cuts (the SIGTERM drain) ends with ``finish_reason: "abort"``
  and an error frame (503) in a stream, and is a 503 without one.
* One access-log line per request (``minicpm.server`` logger): id, prompt, completion and cached
  tokens, time to first token, total time, finish reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.async_engine import BackgroundEngine, EngineError, RequestStream
from ..engine.llm_engine import RequestOutput
from ..engine.sampler import Sampled
from ..sampling import GENERATION_FIELDS, SamplingParams, with_defaults
from ..tokenizer import Tokenizer, TokenizerError
from . import protocol as P
from .metrics import Metrics

log = logging.getLogger("minicpm.server")
ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    503: "unavailable_error",
}
# The default --max-request-bytes: room for a full context of the served model, as text (about 4
# characters a token, up to 6 bytes each once JSON escapes them) or as token ids (up to 8 bytes each),
# and never under 1 MiB.
REQUEST_BYTES_PER_TOKEN = 32
MIN_REQUEST_BYTES = 1 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    return max(MIN_REQUEST_BYTES, max_model_len * REQUEST_BYTES_PER_TOKEN)


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status: a client's mistake is never a ``server_error``."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = P.ErrorResponse(error=P.ErrorInfo(message=message, type=error_type(status), param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclasses.dataclass
class ServerState:
    engine: BackgroundEngine
    tokenizer: Tokenizer
    served_names: list[str]
    chat_format: str = "auto"
    chat_template: str | None = None
    api_keys: Sequence[str] = ()
    max_queued_requests: int = 256
    sampling_defaults: dict[str, float] = dataclasses.field(default_factory=dict)
    max_request_bytes: int | None = None  # None: default_max_request_bytes(max_model_len)
    draining: bool = False
    in_flight: int = 0
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    metrics: Metrics = dataclasses.field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self._key_digests = [hashlib.sha256(k.encode()).digest() for k in self.api_keys]
        self.metrics.bind(self.engine)
        if self.max_request_bytes is None:
            self.max_request_bytes = default_max_request_bytes(self.max_model_len)

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    def key_ok(self, given: str) -> bool:
        digest = hashlib.sha256(given.encode()).digest()
        ok = False
        for expected in self._key_digests:  # every key compared, in constant time
            ok |= secrets.compare_digest(digest, expected)
        return ok


def _json_frame(model: Any) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class _BodyLimit:
    """ASGI middleware: a request body over ``state.max_request_bytes`` gets 413 in the error envelope
    without being parsed. A declared ``Content-Length`` over the limit is refused at once; a body sent
    without one (chunked) is refused as soon as its running size passes the limit. The rest of a
    refused body is read and dropped (so the client, still sending, gets the answer rather than a
    reset connection), never kept."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "the Content-Length header is not a number")(scope, receive, send)
                return
            if int(declared) > limit:
                await self._refuse(scope, receive, send, f"{int(declared):,} bytes")
                return
            await self.app(scope, receive, send)  # the server enforces a declared length itself
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(scope, receive, send, f"over {limit:,} bytes", more=message.get("more_body", False))
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Any:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any, size: str, more: bool = True) -> None:
        limit = self.state.max_request_bytes
        message = (
            f"the request body is {size}; this server takes at most {limit:,} bytes (--max-request-bytes, "
            f"sized for a full context of {self.state.max_model_len} tokens by default)"
        )
        await error_response(413, message, headers={"Connection": "close"})(scope, receive, send)
        while more:  # drop what the client is still sending, a chunk at a time
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="minicpm", version=__version__, description="OpenAI-compatible API of minicpm")
    app.state.minicpm = state
    app.add_middleware(_BodyLimit, state=state)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        given = first.get("input")
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
        elif isinstance(given, float) and not math.isfinite(given):  # JSON's NaN / Infinity literals
            name = "NaN" if math.isnan(given) else "-Infinity" if given < 0 else "Infinity"
            message = f"{param}: {name} is not a number this field takes; give a finite number"
        elif param:
            message = f"{param}: {message}"
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route: " + request.url.path if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}")

    # ------------------------------------------------------------------ auth
    async def authorized(request: Request) -> None:
        if not state.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not state.key_ok(key.strip()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")

    guarded = [Depends(authorized)]
    errors = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 503)}

    # ------------------------------------------------------------------ plain routes
    @app.get("/health", response_class=PlainTextResponse, responses={503: {"content": {"text/plain": {}}}})
    async def health() -> PlainTextResponse:
        if state.draining or not state.engine.alive:  # the server listens only once the model is loaded
            why = "draining" if state.draining else "the engine stopped"
            return PlainTextResponse(why, status_code=503)
        return PlainTextResponse("ok")

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        body, content_type = state.metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/v1/models", dependencies=guarded, response_model=P.ModelList, responses=errors)
    async def models() -> P.ModelList:
        return P.ModelList(
            data=[
                P.ModelCard(
                    id=name,
                    created=state.created,
                    max_model_len=state.max_model_len,
                    sampling_defaults=dict(state.sampling_defaults),
                )
                for name in state.served_names
            ]
        )

    @app.post("/tokenize", dependencies=guarded, response_model=P.TokenizeResponse, responses=errors)
    async def tokenize(body: P.TokenizeRequest) -> P.TokenizeResponse:
        _check_model(state, body.model)
        if body.messages is not None:
            ids = await asyncio.to_thread(_chat_ids, state, body.messages, body.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(state.tokenizer.encode, body.prompt, body.add_special_tokens)
        return P.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)

    @app.post("/detokenize", dependencies=guarded, response_model=P.DetokenizeResponse, responses=errors)
    async def detokenize(body: P.DetokenizeRequest) -> P.DetokenizeResponse:
        _check_model(state, body.model)
        vocab = state.engine.engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary (size {vocab})", "tokens")
        return P.DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))

    # ------------------------------------------------------------------ generation
    @app.post(
        "/v1/chat/completions",
        dependencies=guarded,
        response_model=P.ChatCompletion,
        responses=errors,
    )
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Any:
        name = _check_model(state, body.model)
        _log_unknown(body)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit == 0:  # as vLLM: a chat answer of no tokens is not a request
            field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            raise APIError(400, f"{field}: 0 asks for no answer; give at least 1", field)
        ids = await asyncio.to_thread(_chat_ids, state, body.messages, True, True)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        grammar = await asyncio.to_thread(_grammar, state, body.response_format)
        return await _generate(state, request, body, name, [ids], limit, logprobs, chat=True, grammar=grammar)

    @app.post(
        "/v1/completions",
        dependencies=guarded,
        response_model=P.Completion,
        responses=errors,
    )
    async def completions(body: P.CompletionRequest, request: Request) -> Any:
        name = _check_model(state, body.model)
        _log_unknown(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        prompts = await asyncio.to_thread(_completion_prompts, state, body.prompt)
        limit = 16 if body.max_tokens is None else body.max_tokens
        if limit == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it needs echo (to score the prompt)", "max_tokens")
        return await _generate(state, request, body, name, prompts, limit, body.logprobs, chat=False)

    def openapi() -> dict[str, Any]:
        """FastAPI documents its 422 for invalid bodies; this server answers those with 400."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in spec["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ---------------------------------------------------------------------------------------- helpers
def _check_model(state: ServerState, model: str | None) -> str:
    if model is None or model in state.served_names:
        return model or state.served_names[0]
    raise APIError(404, f"The model `{model}` does not exist.", "model")


def _log_unknown(body: Any) -> None:
    extra = sorted((body.model_extra or {}).keys())
    if extra:
        log.debug("ignored unknown request fields: %s", ", ".join(extra))


def _message_text(i: int, message: P.ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{i}].content[{j}] is a {part.type!r} part; only text parts are supported")
        parts.append(part.text)
    return "".join(parts)


def _check_fits(state: ServerState, num_chars: int) -> None:
    """Refuse a prompt of ``num_chars`` characters that cannot fit the context, before tokenizing it."""
    at_least = state.tokenizer.min_tokens(num_chars)
    if at_least >= state.max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {state.max_model_len} tokens. However, your prompt contains "
            f"{num_chars:,} characters, at least {at_least:,} input tokens, which leaves no room for an answer.",
            "input_tokens",
        )


def _chat_ids(
    state: ServerState, messages: list[P.ChatMessage], add_generation_prompt: bool, must_fit: bool = False
) -> list[int]:
    msgs = [{"role": m.role, "content": _message_text(i, m)} for i, m in enumerate(messages)]
    if must_fit:  # the template only adds to the messages' text
        _check_fits(state, sum(len(m["content"]) for m in msgs))
    try:
        return state.tokenizer.encode_chat(msgs, add_generation_prompt, state.chat_format, state.chat_template)
    except TokenizerError as exc:  # a template that fails on this conversation: the request's problem
        raise APIError(400, str(exc), "messages") from None


def _completion_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    def encode(text: str) -> list[int]:
        _check_fits(state, len(text))
        return state.tokenizer.encode(text)

    if isinstance(prompt, str):
        return [encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [encode(p) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists", "prompt")


def _grammar(state: ServerState, response_format: dict[str, Any] | None) -> str | None:
    """An llguidance grammar for ``response_format`` (None for plain text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema (an object)", "response_format")
    else:
        raise APIError(400, f"response_format type {kind!r} is not text, json_object or json_schema", "response_format")
    try:
        import llguidance
    except ImportError:
        raise APIError(400, "structured output needs the llguidance package on the server", "response_format") from None
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
    error = llguidance.LLMatcher.validate_grammar(grammar) or state.engine.engine.runner.sampler.check_grammar(grammar)
    if error:
        raise APIError(400, f"response_format schema is not usable: {error}", "response_format")
    return grammar


def _params(
    state: ServerState, body: Any, limit: int | None, logprobs: int | None, seed: int | None, grammar: str | None
) -> SamplingParams:
    """``limit`` 0 (echo, scoring the prompt): one token is generated and then dropped."""
    echo_scores = getattr(body, "echo", False) and logprobs is not None
    stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
    chosen = with_defaults({k: getattr(body, k) for k in GENERATION_FIELDS}, state.sampling_defaults)
    return SamplingParams(
        max_new_tokens=max(1, limit) if limit is not None else 1 << 30,
        temperature=chosen["temperature"],
        top_p=chosen["top_p"],
        top_k=max(0, int(chosen["top_k"])),  # vLLM's -1 is off, like 0
        min_p=body.min_p if body.min_p is not None else 0.0,
        repetition_penalty=chosen["repetition_penalty"],
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=seed,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        min_tokens=min(body.min_tokens, limit) if limit else 0 if limit == 0 else body.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo_scores else None,
        grammar=grammar,
    )


def _make_requests(
    state: ServerState,
    prompts: list[list[int]],
    body: Any,
    limit: int | None,
    logprobs: int | None,
    grammar: str | None,
):
    engine = state.engine.engine
    requests = []
    for p, ids in enumerate(prompts):
        if len(ids) >= state.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {state.max_model_len} tokens. However, your prompt "
                f"contains {len(ids)} input tokens, which leaves no room for an answer.",
                "input_tokens",
            )
        for i in range(body.n):
            seed = None if body.seed is None else (body.seed + i) % 2**64
            try:
                params = _params(state, body, limit, logprobs, seed, grammar)
                requests.append((p * body.n + i, engine.make_request(ids, params)))
            except ValueError as exc:
                raise APIError(400, str(exc)) from None
    return requests


class _Leader:
    """The first choice of a prompt; ``prefilled`` is set once its prompt has been computed (its
    first output) or it ended."""

    def __init__(self, stream: RequestStream) -> None:
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

    def __init__(self, engine: BackgroundEngine, request: Any, loop: asyncio.AbstractEventLoop, ready: asyncio.Event):
        self.engine, self.request, self.loop, self.ready = engine, request, loop, ready
        self.stream: RequestStream | None = None
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


async def _generate(
    state: ServerState,
    request: Request,
    body: Any,
    name: str,
    prompts: list[list[int]],
    limit: int | None,
    logprobs: int | None,
    chat: bool,
    grammar: str | None = None,
) -> Any:
    if state.draining:
        raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
    engine = state.engine
    capacity = engine.engine.config.max_num_seqs + state.max_queued_requests
    made = await asyncio.to_thread(_make_requests, state, prompts, body, limit, logprobs, grammar)
    if state.in_flight + len(made) > capacity:
        raise APIError(
            503, "The engine is currently busy (the queue is full); try again.", headers={"Retry-After": "1"}
        )
    loop = asyncio.get_running_loop()
    request_id = P.new_id("chatcmpl" if chat else "cmpl")
    start = time.monotonic()
    streams: list[tuple[int, Any]] = []
    for index, r in made:
        if index % body.n == 0:  # the first choice of a prompt goes now
            leader = _Leader(engine.submit(r, loop))
            streams.append((index, leader))
        else:  # the others once its prompt is in the KV cache, so they share its blocks
            streams.append((index, _Follower(engine, r, loop, leader.prefilled)))
    state.in_flight += len(streams)
    choices = [_Choice(prompt_tokens=r.seq.num_prompt_tokens) for _, r in made]
    first_of_prompt = {p * body.n for p in range(len(prompts))}
    score_only = not chat and limit == 0
    echo_text = [
        state.tokenizer.decode(prompts[i // body.n]) if not chat and body.echo else "" for i in range(len(made))
    ]

    def take(index: int, out: RequestOutput) -> RequestOutput:
        c = choices[index]
        now = time.monotonic()
        if out.token_ids:
            if c.first_token is None:
                c.first_token = now
                state.metrics.ttft.observe(now - start)
            elif c.last_token is not None:
                state.metrics.itl.observe((now - c.last_token) / len(out.token_ids))
            c.last_token = now
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if score_only:  # max_tokens 0: the one generated token is not part of the answer
            out = dataclasses.replace(out, text="", token_ids=[], logprobs=[])
        c.text += out.text
        c.token_ids += out.token_ids
        if out.logprobs:
            c.logprobs += out.logprobs
        if out.finished:
            c.finish_reason = out.finish_reason
            c.cached_tokens = out.cached_tokens
            c.queue_time = out.queue_time
        return out

    closed = []

    def done() -> None:
        """Once per HTTP request, however it ends: abort what is still running, count, log."""
        if closed:
            return
        closed.append(True)
        for _, s in streams:
            s.cancel()
        state.in_flight -= len(streams)
        end = time.monotonic()
        for i, c in enumerate(choices):
            state.metrics.finished(c, end - start, counted_prompt=i in first_of_prompt)
        first = choices[0]
        ttft = f"{first.first_token - start:.3f}s" if first.first_token else "-"
        usage = _usage(choices, first_of_prompt)
        log.info(
            "%s prompt=%d completion=%d cached=%d ttft=%s total=%.3fs finish=%s",
            request_id,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.prompt_tokens_details.cached_tokens,
            ttft,
            end - start,
            ",".join(str(c.finish_reason) for c in choices),
        )

    def respond() -> P.ChatCompletion | P.Completion:
        usage = _usage(choices, first_of_prompt)
        if chat:
            return P.ChatCompletion(
                id=request_id,
                model=name,
                choices=[
                    P.ChatChoice(
                        index=i,
                        message=P.AssistantMessage(content=c.text),
                        logprobs=_chat_logprobs(state.tokenizer, c.logprobs) if logprobs is not None else None,
                        finish_reason=_finish(c.finish_reason),
                    )
                    for i, c in enumerate(choices)
                ],
                usage=usage,
            )
        return P.Completion(
            id=request_id,
            model=name,
            choices=[
                P.CompletionChoice(
                    index=i,
                    text=echo_text[i] + c.text,
                    logprobs=_echoed_logprobs(state.tokenizer, prompts[i // body.n], c, echo_text[i])
                    if logprobs is not None
                    else None,
                    finish_reason=_finish(c.finish_reason),
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        )

    if not body.stream:
        try:
            finished = await _until_disconnect(request, _collect(streams, take))
        except EngineError as exc:
            raise APIError(500, str(exc)) from None
        finally:
            done()
        if not finished:
            return JSONResponse({}, status_code=499)  # nobody is listening
        if any(c.finish_reason == "abort" for c in choices):  # cut by the drain: not an answer
            raise APIError(503, _cut_message(choices), headers={"Retry-After": "5"})
        # built and serialized off the event loop: an echoed prompt's logprobs can be a whole context of entries
        return await asyncio.to_thread(lambda: Response(respond().model_dump_json(), media_type="application/json"))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    created = int(time.time())

    def chunk(index: int, text: str | None, items: list[Sampled] | None, finish: str | None, role: bool = False):
        if chat:
            lp = _chat_logprobs(state.tokenizer, items) if items is not None and logprobs is not None else None
            delta = P.Delta(role="assistant", content="") if role else P.Delta(content=text)
            choice = P.ChatChunkChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)
            return P.ChatCompletionChunk(id=request_id, created=created, model=name, choices=[choice])
        offset = len(echo_text[index]) + len(choices[index].text) - len(text or "")
        lp = (
            _completion_logprobs(state.tokenizer, items, offset) if items is not None and logprobs is not None else None
        )
        choice = P.CompletionChoice(index=index, text=text or "", logprobs=lp, finish_reason=finish)
        return P.Completion(id=request_id, created=created, model=name, choices=[choice])

    def echo_frame(index: int) -> str:
        scored = _Choice(prompt_logprobs=choices[index].prompt_logprobs)
        prompt = prompts[index // body.n]
        lp = _echoed_logprobs(state.tokenizer, prompt, scored, echo_text[index]) if logprobs is not None else None
        choice = P.CompletionChoice(index=index, text=echo_text[index], logprobs=lp, finish_reason=None)
        return _json_frame(P.Completion(id=request_id, created=created, model=name, choices=[choice]))

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                for i in range(len(choices)):
                    yield _json_frame(chunk(i, None, None, None, role=True))
            echoed: set[int] = set()
            async for index, raw in _merged(streams):
                out = take(index, raw)
                if not chat and body.echo and index not in echoed:  # the prompt (and its logprobs) first
                    echoed.add(index)
                    yield await asyncio.to_thread(echo_frame, index)  # a whole context of entries: off the loop
                if out.text or (out.token_ids and logprobs is not None):
                    yield _json_frame(chunk(index, out.text, out.logprobs or [], None))
                if out.finished:
                    if chat:
                        yield _json_frame(chunk(index, None, None, _finish(out.finish_reason)))
                    else:
                        yield _json_frame(chunk(index, "", None, _finish(out.finish_reason)))
            if include_usage:
                usage = _usage(choices, first_of_prompt)
                if chat:
                    yield _json_frame(
                        P.ChatCompletionChunk(id=request_id, created=created, model=name, choices=[], usage=usage)
                    )
                else:
                    yield _json_frame(P.Completion(id=request_id, created=created, model=name, choices=[], usage=usage))
            if any(c.finish_reason == "abort" for c in choices):  # cut by the drain: say so, not just "abort"
                cut = P.ErrorInfo(message=_cut_message(choices), type=error_type(503), code=503)
                yield _json_frame(P.ErrorResponse(error=cut))
        except EngineError as exc:
            info = P.ErrorResponse(error=P.ErrorInfo(message=str(exc), type="server_error", code=500))
            yield _json_frame(info)
        finally:
            done()
        yield "data: [DONE]\n\n"

    return _GuardedStream(events(), done, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


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


async def _collect(streams: list[tuple[int, Any]], take: Callable[[int, RequestOutput], None]) -> bool:
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
