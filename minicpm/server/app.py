"""The OpenAI-compatible HTTP API over one engine client (:class:`~minicpm.engine.client.EngineClient`).

Contract (``build_app(state)``): the server sees the engine only through the client protocol.
Routes are module-level functions of a few lines on one ``APIRouter``; generation runs in
:mod:`minicpm.server.answers`, one builder per response shape.

* ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events or
  not), ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``, ``GET /health``, ``GET
  /version``, ``GET /metrics``; the chat page at ``GET /`` (:mod:`minicpm.server.page`, unless
  ``state.web`` is off). Requests from every client share the engine's batches.
* Errors always use OpenAI's nested envelope ``{"error": {"message", "type", "param", "code"}}``:
  400 for malformed JSON, wrong types, out-of-range or non-finite values, a chat ``max_tokens`` of
  0, a ``json_schema`` no output can satisfy, and prompts that alone fill the context
  (``max_tokens`` beyond the room left is clamped, as vLLM does); 401 for a missing or wrong key
  (compared in constant time) on every route but ``/health``, ``/metrics``, ``/version`` and the
  page's files; 404 for an unknown model or route; 413 for a body over ``max_request_bytes``,
  unparsed; 503 with ``Retry-After`` when the queue is full or the server is draining. A client's mistake is never a
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
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.client import EngineClient
from ..tokenizer import Tokenizer, TokenizerError
from . import protocol as P
from .answers import ChatAnswer, CompletionAnswer, answer
from .errors import ERROR_TYPES, APIError, error_response, error_type
from .metrics import Metrics
from .page import page_routes

__all__ = ["ERROR_TYPES", "APIError", "ServerState", "build_app", "default_max_request_bytes", "error_type"]

log = logging.getLogger("minicpm.server")
# The default --max-request-bytes: room for a full context of the served model, as text (about 4
# characters a token, up to 6 bytes each once JSON escapes them) or as token ids (up to 8 bytes each),
# and never under 1 MiB.
REQUEST_BYTES_PER_TOKEN = 32
MIN_REQUEST_BYTES = 1 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    return max(MIN_REQUEST_BYTES, max_model_len * REQUEST_BYTES_PER_TOKEN)


@dataclasses.dataclass
class ServerState:
    engine: EngineClient
    tokenizer: Tokenizer
    served_names: list[str]
    chat_format: str = "auto"
    chat_template: str | None = None
    api_keys: Sequence[str] = ()
    max_queued_requests: int = 256
    sampling_defaults: dict[str, float] = dataclasses.field(default_factory=dict)
    max_request_bytes: int | None = None  # None: default_max_request_bytes(max_model_len)
    web: bool = True  # the chat page at / (minicpm.server.page); --no-web turns it off
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
        return self.engine.limits().max_model_len

    def key_ok(self, given: str) -> bool:
        digest = hashlib.sha256(given.encode()).digest()
        ok = False
        for expected in self._key_digests:  # every key compared, in constant time
            ok |= secrets.compare_digest(digest, expected)
        return ok


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


# ---------------------------------------------------------------------------------------- errors
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.headers)


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


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = "no such route: " + request.url.path if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return error_response(500, f"internal server error: {type(exc).__name__}")


# ---------------------------------------------------------------------------------------- routes
def _state(request: Request) -> ServerState:
    return request.app.state.minicpm


async def _authorized(request: Request) -> None:
    state = _state(request)
    if not state.api_keys:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not state.key_ok(key.strip()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")


routes = APIRouter()
GUARDED = [Depends(_authorized)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 503)}


@routes.get("/health", response_class=PlainTextResponse, responses={503: {"content": {"text/plain": {}}}})
async def health(request: Request) -> PlainTextResponse:
    state = _state(request)
    if state.draining or not state.engine.alive:  # the server listens only once the model is loaded
        return PlainTextResponse("draining" if state.draining else "the engine stopped", status_code=503)
    return PlainTextResponse("ok")


@routes.get("/version")
async def version() -> dict:
    return {"version": __version__}


@routes.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    body, content_type = _state(request).metrics.render()
    return PlainTextResponse(body, media_type=content_type)


@routes.get("/v1/models", dependencies=GUARDED, response_model=P.ModelList, responses=ERRORS)
async def models(request: Request) -> P.ModelList:
    state = _state(request)
    card = {"created": state.created, "max_model_len": state.max_model_len}
    return P.ModelList(
        data=[
            P.ModelCard(id=name, sampling_defaults=dict(state.sampling_defaults), **card) for name in state.served_names
        ]
    )


@routes.post("/tokenize", dependencies=GUARDED, response_model=P.TokenizeResponse, responses=ERRORS)
async def tokenize(body: P.TokenizeRequest, request: Request) -> P.TokenizeResponse:
    state = _state(request)
    _check_model(state, body.model)
    if body.messages is not None:
        ids = await asyncio.to_thread(_chat_ids, state, body.messages, body.add_generation_prompt)
    else:
        ids = await asyncio.to_thread(state.tokenizer.encode, body.prompt, body.add_special_tokens)
    return P.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)


@routes.post("/detokenize", dependencies=GUARDED, response_model=P.DetokenizeResponse, responses=ERRORS)
async def detokenize(body: P.DetokenizeRequest, request: Request) -> P.DetokenizeResponse:
    state = _state(request)
    _check_model(state, body.model)
    vocab = state.engine.limits().vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary (size {vocab})", "tokens")
    return P.DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


@routes.post("/v1/chat/completions", dependencies=GUARDED, response_model=P.ChatCompletion, responses=ERRORS)
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Any:
    state = _state(request)
    name = _check_model(state, body.model)
    _log_unknown(body)
    if body.answer_limit() == 0:  # as vLLM: a chat answer of no tokens is not a request
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise APIError(400, f"{field}: 0 asks for no answer; give at least 1", field)
    ids = await asyncio.to_thread(_chat_ids, state, body.messages, True, True)
    grammar = await asyncio.to_thread(_grammar, state, body.response_format)
    return await answer(ChatAnswer(state, body, name, ids, grammar), request)


@routes.post("/v1/completions", dependencies=GUARDED, response_model=P.Completion, responses=ERRORS)
async def completions(body: P.CompletionRequest, request: Request) -> Any:
    state = _state(request)
    name = _check_model(state, body.model)
    _log_unknown(body)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    prompts = await asyncio.to_thread(_completion_prompts, state, body.prompt)
    if body.answer_limit() == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 generates nothing; it needs echo (to score the prompt)", "max_tokens")
    return await answer(CompletionAnswer(state, body, name, prompts), request)


# ---------------------------------------------------------------------------------------- the app
def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="minicpm", version=__version__, description="OpenAI-compatible API of minicpm")
    app.state.minicpm = state
    app.add_middleware(_BodyLimit, state=state)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_fault)
    app.include_router(routes)
    if state.web:
        app.include_router(page_routes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents its 422 for invalid bodies; this server answers those with 400."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path in spec["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = spec
    return app.openapi_schema


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
    error = llguidance.LLMatcher.validate_grammar(grammar) or state.engine.check_grammar(grammar)
    if error:
        raise APIError(400, f"response_format schema is not usable: {error}", "response_format")
    return grammar
