"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Contract: request models accept and ignore fields they do not know (clients send many; vLLM
does the same) and validate every field they do know, so a wrong type or an out-of-range value
is a 400 that names the field. ``to_sampling_params`` turns a generation request into the
engine's :class:`~minicpm.sampling.SamplingParams`. Response models are exactly OpenAI's shapes; ``/openapi.json``
is generated from these classes, so it describes the real API.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from ..sampling import GENERATION_FIELDS, MAX_LOGPROBS, SamplingParams, with_defaults


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: accepted, ignored (logged)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def answer_limit(self) -> int | None:
        """The most tokens the answer may have (None: as many as the context leaves)."""
        return self.max_tokens

    def logprob_count(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs)."""
        return None

    def scores_prompt(self) -> bool:
        """Whether the prompt's own tokens are scored (echo with logprobs)."""
        return False

    def to_sampling_params(
        self, defaults: dict[str, float], seed: int | None = None, grammar: str | None = None
    ) -> SamplingParams:
        """The engine's settings for one choice: ``defaults`` fill the unset temperature, top-p,
        top-k and repetition penalty; ``seed`` is this choice's. An answer limit of 0 (echo,
        scoring the prompt) generates one token, which is then dropped."""
        limit, logprobs = self.answer_limit(), self.logprob_count()
        stop = self.stop if isinstance(self.stop, list) else [self.stop] if self.stop else []
        chosen = with_defaults({k: getattr(self, k) for k in GENERATION_FIELDS}, defaults)
        return SamplingParams(
            max_new_tokens=max(1, limit) if limit is not None else 1 << 30,
            temperature=chosen["temperature"],
            top_p=chosen["top_p"],
            top_k=max(0, int(chosen["top_k"])),  # vLLM's -1 is off, like 0
            min_p=self.min_p if self.min_p is not None else 0.0,
            repetition_penalty=chosen["repetition_penalty"],
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, limit) if limit else 0 if limit == 0 else self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=logprobs if self.scores_prompt() else None,
            grammar=grammar,
        )

    def choice_seed(self, i: int) -> int | None:
        """The seed of choice ``i`` of ``n`` (each choice its own, from the request's)."""
        return None if self.seed is None else (self.seed + i) % 2**64

    @model_validator(mode="after")
    def _check_stream_options(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        if isinstance(self.stop, list) and any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None

    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    def answer_limit(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    def logprob_count(self) -> int | None:
        return self.logprobs

    def scores_prompt(self) -> bool:
        return self.echo and self.logprobs is not None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------------------------ responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict:  # OpenAI leaves unset delta fields out
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _usage_when_given(self, handler: Any) -> dict:  # only the final usage chunk carries it
        data = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minicpm"
    max_model_len: int
    sampling_defaults: dict[str, float] = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
