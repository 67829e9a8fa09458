"""OpenAI chat-completions protocol types (pydantic v2): the request, the response, the streaming chunk,
usage, logprobs and the error body, as https://platform.openai.com/docs/api-reference/chat defines them.

Requests are parsed with `parse_chat_request(obj)`: a bad value raises OpenAIError(400) whose `param` names it
("temperature", "messages[0].content[1]"). A field the server does not honour is refused, never silently
ignored (NOT_HONOURED says which values of which fields are accepted because they change nothing), and so
is a field no table knows (OpenAI refuses those too: "Unrecognized request argument"). Extensions: `top_k`
(0 or -1 = off, as in vLLM), vLLM's repetition_penalty / min_tokens / stop_token_ids (sampling_protocol.py,
with OpenAI's penalties and logit_bias), and a content part's `image_url` may be a bare URL string.
Structured output: `response_format` (json_object, json_schema) and function `tools` with `tool_choice` and
`parallel_tool_calls`, checked here for shape (names, a tool_choice naming an offered function) and turned
into a grammar by pixtral_rt/server/constraints.py; answers carry `tool_calls` (whole and as stream deltas).
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from .sampling_protocol import SamplingControls


def stop_list(v):
    """OpenAI's `stop`: absent, one string or a list -> a list (chat and completions requests)."""
    if v is None:
        return []
    return [v] if isinstance(v, str) else v


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
ANY = "any value"   # accepted whatever it is: bookkeeping that cannot change the answer
UNSUPPORTED = ()    # no value accepted (null, "not set", aside)

# Request fields the server does not honour -> the values accepted because they change nothing. JSON null
# ("not set") is always accepted; any other value is refused with 400 naming the field (code
# unsupported_parameter). Keys are paths: "tools" is a request field, "messages[].refusal" a field of a
# message, "messages[].content[].x" of a content part, "stream_options.x" of stream_options. A field that is
# neither a model field nor listed here is refused too (code unknown_parameter). The applications issue will
# implement tools and response_format (the penalties and vLLM's sampling extras did: sampling_protocol.py;
# tools, tool_choice, parallel_tool_calls and response_format did: structured output); each then becomes a
# field of its model and leaves this table (tests/test_openai_protocol.py checks that no key is both).
# A message's `name` is a ChatMessage field: accepted, and since Mistral's chat formats have no speaker names,
# used only as a tool message's tool name.
NOT_HONOURED: dict[str, tuple | str] = {
    # OpenAI's deprecated forms of tools / tool_choice
    "functions": ([],), "function_call": ("none", "auto"),
    # sampling and output this server does not implement
    "modalities": (["text"],),
    "service_tier": ("auto", "default"), "prediction": UNSUPPORTED, "audio": UNSUPPORTED,
    "reasoning_effort": UNSUPPORTED, "verbosity": UNSUPPORTED, "web_search_options": UNSUPPORTED,
    # bookkeeping
    "user": ANY, "metadata": ANY, "store": ANY, "prompt_cache_key": ANY, "safety_identifier": ANY,
    # vLLM's extensions but top_k (a field: honoured)
    "min_p": (0,), "ignore_eos": (False,), "best_of": (1,),
    "use_beam_search": (False,), "length_penalty": (1,),
    "include_stop_str_in_output": (False,), "echo": (False,), "add_generation_prompt": (True,),
    "continue_final_message": (False,), "chat_template_kwargs": ({},), "priority": (0,),
    "prompt_logprobs": UNSUPPORTED, "chat_template": UNSUPPORTED, "guided_json": UNSUPPORTED,
    "guided_regex": UNSUPPORTED, "guided_choice": UNSUPPORTED, "guided_grammar": UNSUPPORTED,
    "structured_outputs": UNSUPPORTED, "truncate_prompt_tokens": UNSUPPORTED, "logits_processors": UNSUPPORTED,
    # what OpenAI's own responses carry, sent back in an assistant message of the history
    "messages[].refusal": UNSUPPORTED, "messages[].annotations": ([],), "messages[].audio": UNSUPPORTED,
    "messages[].function_call": UNSUPPORTED,
    "stream_options.include_obfuscation": ANY, "stream_options.continuous_usage_stats": (False,),
}


def _same(value, accepted) -> bool:
    """JSON equality: 0 == 0.0, but false is not 0 (a Python bool is an int)."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return type(value) is type(accepted) and value == accepted
    return value == accepted


def _refusal(path: str, name: str, value, table: dict | None = None) -> PydanticCustomError | None:
    """Why the extra field `name` (table key `path` of `table`, default NOT_HONOURED) with `value` is refused,
    or None when it is accepted. The message is the whole template: accepted values in it hold braces that
    pydantic must not format."""
    accepted = (NOT_HONOURED if table is None else table).get(path)
    if accepted is None:
        return PydanticCustomError("unknown_parameter", "{message}", {
            "name": name, "message": "unrecognized request argument (this server does not know it): leave it out"})
    if value is None or accepted == ANY or any(_same(value, a) for a in accepted):
        return None
    message = "not supported by this server: leave it out"
    if accepted:
        alts = " or ".join(json.dumps(a) for a in accepted)
        message = (f"not supported by this server (only {alts}, which change{'s' if len(accepted) == 1 else ''} "
                   f"nothing, {'is' if len(accepted) == 1 else 'are'} accepted): leave it out")
    return PydanticCustomError("unsupported_parameter", "{message}", {"name": name, "message": message})


class _Checked(BaseModel):
    """A protocol object whose extra fields are looked up in NOT_HONOURED (under `_PATH`) before validation:
    accepted ones are dropped, any other raises (parse_chat_request names the field)."""

    model_config = ConfigDict(extra="forbid")  # a backstop: every extra field was decided on before
    _PATH: ClassVar[str] = ""
    _NOT_HONOURED: ClassVar[dict | None] = None   # the table its extra fields are looked up in (None: NOT_HONOURED)

    @model_validator(mode="before")
    @classmethod
    def _refuse_not_honoured(cls, data):
        if not isinstance(data, dict):
            return data  # pydantic refuses it with the usual message
        known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
        for name in [k for k in data if k not in known]:  # in the request's order
            refusal = _refusal(cls._PATH + name, name, data[name], cls._NOT_HONOURED)
            if refusal is not None:
                raise refusal
        return {k: v for k, v in data.items() if k in known}


class ImageURL(_Checked):
    _PATH = "messages[].content[].image_url."
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Pixtral sees each image at its own size


class ContentPart(_Checked):
    """{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}; the url is an
    http(s) URL or a data:image/...;base64 URL (local paths only where the operator allows a folder)."""

    _PATH = "messages[].content[]."

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


class ChatMessage(_Checked):
    _PATH = "messages[]."
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


class StreamOptions(_Checked):
    _PATH = "stream_options."
    include_usage: bool = False


# a function name as Mistral's chat formats take it (mistral_common's validator), and as OpenAI documents it
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(_Checked):
    _PATH = "tools[].function."
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None   # a JSON schema; none: the function takes no arguments
    strict: bool | None = None                 # accepted: every call is held to its parameters by a grammar


class ChatTool(_Checked):
    _PATH = "tools[]."
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Checked):
    _PATH = "tool_choice.function."
    name: str


class NamedToolChoice(_Checked):
    _PATH = "tool_choice."
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Checked):
    _PATH = "response_format.json_schema."
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")   # "schema" would shadow pydantic's BaseModel.schema
    strict: bool | None = None                        # accepted: the schema is always enforced


class ResponseFormat(_Checked):
    _PATH = "response_format."
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs 'json_schema': {'name': ..., 'schema': {...}}")
        return self


class ChatCompletionRequest(SamplingControls, _Checked):
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
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        return stop_list(v)

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

    def tool_dicts(self) -> list[dict] | None:
        """The tools as pixtral_rt.chat.encode_request takes them (None: no tools)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


def _check_tools(req: ChatCompletionRequest) -> None:
    """What no single field can check: tool_choice against the tools, and response_format beside them."""
    names = [t.function.name for t in req.tools or []]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise OpenAIError(400, f"tools[{i}].function.name: {n!r} is offered twice: function names must be "
                                   "unique", param=f"tools[{i}].function.name", code="invalid_value")
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            offered = ", ".join(names) if names else "no tools were given"
            raise OpenAIError(400, f"tool_choice.function.name: {choice.function.name!r} is not one of the "
                                   f"offered tools ({offered})", param="tool_choice.function.name",
                              code="invalid_value")
    elif choice == "required" and not names:
        raise OpenAIError(400, "tool_choice: 'required' needs at least one tool in 'tools'", param="tool_choice",
                          code="invalid_value")
    fmt = req.response_format
    if names and fmt is not None and fmt.type != "text" and (choice == "required" or isinstance(choice,
                                                                                              NamedToolChoice)):
        raise OpenAIError(400, f"response_format: {fmt.type} with tools is only possible with tool_choice 'auto' "
                               "(the answer is the JSON or tool calls) or 'none'", param="response_format",
                          code="invalid_value")


def _param_name(loc: tuple) -> str | None:
    """pydantic's ('messages', 0, 'content', 1) -> 'messages[0].content[1]'. Union member tags in the path
    ("literal['none','auto','required']", "NamedToolChoice") are left out: fields here are lower case."""
    out = ""
    for p in loc:
        if isinstance(p, str) and (p[:1].isupper() or "[" in p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def parse_chat_request(obj: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; OpenAIError(400) naming the first bad parameter otherwise."""
    return parse_request(obj, ChatCompletionRequest)


def parse_request(obj: Any, model: type[BaseModel]):
    """Validate a decoded JSON body as `model` (a _Checked request); OpenAIError(400) naming the first bad
    parameter otherwise."""
    if not isinstance(obj, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                          code="invalid_request")
    try:
        req = model.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors()
        # of the first bad field's errors, the deepest: for a union (tool_choice) that is the member the value
        # was meant as ({"type": "function", ...}), not the first member tried (the strings)
        err = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]), key=lambda e: len(e["loc"]))
        if err["type"] in ("unsupported_parameter", "unknown_parameter"):  # the param is the extra field itself
            param = _param_name((*err["loc"], err["ctx"]["name"]))
            raise OpenAIError(400, f"{param}: {err['msg']}", param=param, code=err["type"]) from exc
        param = _param_name(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] != "value_error" and "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r:.80})"
        raise OpenAIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value") from exc
    if isinstance(req, ChatCompletionRequest):
        _check_tools(req)
    return req


# ------------------------------------------------------------------------------------------------ response
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None   # the token's UTF-8 bytes (a token may hold part of a character)


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str                     # JSON text, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer
    def _no_empty_calls(self) -> dict:
        # OpenAI leaves tool_calls out of a message without calls
        out = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None   # "stop" (EOS, a stop string, a complete grammar), "length" (max_tokens),
                                       # "tool_calls" (the answer is tool calls)


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


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(BaseModel):
    """A call's first delta carries id, type and function.name (arguments ""), the next ones arguments only."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall

    @model_serializer
    def _set_fields_only(self) -> dict:
        out: dict = {"index": self.index}
        if self.id is not None:
            out["id"], out["type"] = self.id, "function"
        out["function"] = ({"name": self.function.name, "arguments": self.function.arguments}
                           if self.function.name is not None else {"arguments": self.function.arguments})
        return out


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer
    def _set_fields_only(self) -> dict:
        # OpenAI's deltas carry only what changed: {"role": ...} first, then {"content": ...} or
        # {"tool_calls": [...]}, finally {}
        out = {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


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
