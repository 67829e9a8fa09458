"""OpenAI chat-completions protocol types (pydantic v2): the request, the response, the streaming chunk,
usage, logprobs and the error body, as https://platform.openai.com/docs/api-reference/chat defines them.

Requests are parsed with `parse_chat_request(obj)`: unknown fields are tolerated (as OpenAI does), a bad one
raises OpenAIError(400) whose `param` names it ("temperature", "messages[0].content[1]"). Extensions:
`top_k` (0 or -1 = off, as in vLLM), and a content part's `image_url` may be a bare URL string.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ------------------------------------------------------------------------------------------------ request
class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")  # like OpenAI: fields this server does not know are ignored


class ImageURL(_Tolerant):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Pixtral sees each image at its own size


class ContentPart(_Tolerant):
    """{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}; the url is an
    http(s) URL or a data:image/...;base64 URL (local paths only where the operator allows a folder)."""

    type: str
    text: str | None = None
    image_url: ImageURL | None = None

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, v):
        return {"url": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_kind(self):
        if self.type == "text":
            if self.text is None:
                raise ValueError("a text part needs a string 'text'")
        elif self.type == "image_url":
            if self.image_url is None:
                raise ValueError("an image_url part needs 'image_url': {'url': ...}")
        else:
            raise ValueError(f"unknown content part type {self.type!r}: use 'text' or 'image_url'")
        return self

    def to_chat(self) -> dict:
        if self.type == "text":
            return {"type": "text", "text": self.text}
        return {"type": "image_url", "image_url": {"url": self.image_url.url}}


class ChatMessage(_Tolerant):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_part(cls, v):
        # a plain string is one text part, which the chat format encodes exactly like the string
        return [{"type": "text", "text": v}] if isinstance(v, str) else v

    def to_chat(self) -> dict:
        """The message as pixtral_rt.chat.encode_request takes it; 'developer' (OpenAI's newer name for the
        system role) becomes 'system'."""
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                             "content": None if self.content is None else [p.to_chat() for p in self.content]}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                m[key] = getattr(self, key)
        return m


class StreamOptions(_Tolerant):
    include_usage: bool = False


class ChatCompletionRequest(_Tolerant):
    model: str | None = None                  # when given, must be the served model's name
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name; wins over max_tokens
    temperature: float | None = Field(None, ge=0.0, le=2.0)   # default 1, as OpenAI
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)                     # extension: 0 or -1 = off
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    n: int | None = Field(None, ge=1, le=16)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def image_count(self) -> int:
        return sum(p.type == "image_url" for m in self.messages for p in (m.content or []))

    def chat_messages(self) -> list[dict]:
        return [m.to_chat() for m in self.messages]


def _param_name(loc: tuple) -> str | None:
    """pydantic's ('messages', 0, 'content', 1) -> 'messages[0].content[1]'."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def parse_chat_request(obj: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; OpenAIError(400) naming the first bad parameter otherwise."""
    if not isinstance(obj, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                          code="invalid_request")
    try:
        return ChatCompletionRequest.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param_name(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r:.80})"
        raise OpenAIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value") from exc


# ------------------------------------------------------------------------------------------------ response
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None   # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None   # "stop" (EOS or a stop string) or "length" (max_tokens)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0             # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_fields_only(self) -> dict:
        # OpenAI's deltas carry only what changed: {"role": ...} first, then {"content": ...}, finally {}
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None         # sent (null until the last chunk) only with stream_options.include_usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pixtral_rt"
    max_model_len: int | None = None   # extension (as vLLM): context size in tokens


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
