"""Protocol types of the text routes (pydantic v2): OpenAI's legacy completions (POST /v1/completions,
https://platform.openai.com/docs/api-reference/completions), and vLLM's POST /tokenize and /detokenize.

Parsing follows protocol.py: `parse_request(obj, CompletionRequest)` raises OpenAIError(400) naming the bad
parameter; a field the server does not honour is refused unless its value changes nothing (the tables below,
as NOT_HONOURED is for chat), and a field no table knows is refused as unrecognized.

Completions: `prompt` is a string, a list of token ids, or a list of either (several prompts: choice
prompt_index * n + j, as OpenAI numbers them); `logprobs` is an int (the top-k per token, up to 20 here,
OpenAI stops at 5) answered in the legacy shape {tokens, token_logprobs, top_logprobs, text_offset};
`max_tokens` defaults to 16 as with OpenAI; `echo` puts the prompt's text before the answer (not with
logprobs: that needs the prompt's logprobs, which this server does not compute); `add_special_tokens`
(vLLM's, default true) starts a string prompt with BOS.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from .protocol import ANY, UNSUPPORTED, ChatMessage, ChatTool, StreamOptions, Usage, _Checked, stop_list
from .sampling_protocol import SamplingControls

MAX_PROMPTS = 64           # prompts in one /v1/completions request
MAX_CHOICES = 256          # prompts x n: engine requests one HTTP request may queue
DEFAULT_MAX_TOKENS = 16    # OpenAI's default for completions

# /v1/completions fields the server does not honour -> the values accepted because they change nothing
# (null is always accepted); see protocol.NOT_HONOURED for the rules
COMPLETION_NOT_HONOURED: dict[str, tuple | str] = {
    "suffix": ("",), "best_of": (1,), "user": ANY,
    "response_format": ({"type": "text"},), "service_tier": ("auto", "default"), "metadata": ANY,
    # vLLM's extensions but top_k, add_special_tokens and the sampling controls (fields: honoured)
    "min_p": (0,), "ignore_eos": (False,),
    "use_beam_search": (False,), "length_penalty": (1,),
    "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
    "priority": (0,), "bad_words": ([],), "allowed_token_ids": UNSUPPORTED, "prompt_logprobs": UNSUPPORTED,
    "truncate_prompt_tokens": UNSUPPORTED, "prompt_embeds": UNSUPPORTED, "guided_json": UNSUPPORTED,
    "guided_regex": UNSUPPORTED, "guided_choice": UNSUPPORTED, "guided_grammar": UNSUPPORTED,
    "structured_outputs": UNSUPPORTED, "logits_processors": UNSUPPORTED, "return_tokens_as_token_ids": (False,),
}

# /tokenize (vLLM's): the Mistral chat format always ends with the generation prompt ([/INST])
TOKENIZE_NOT_HONOURED: dict[str, tuple | str] = {
    "add_generation_prompt": (True,), "continue_final_message": (False,), "chat_template": UNSUPPORTED,
    "chat_template_kwargs": ({},), "mm_processor_kwargs": UNSUPPORTED,
}


def _prompts(v) -> tuple[list[str | list[int]], bool]:
    """OpenAI's four prompt shapes -> (prompts, batched): a string, a list of token ids (one prompt each), a
    list of strings or a list of lists of token ids (several). Token ids are range-checked later
    (pixtral_rt.text_prompt), with the index of the bad one."""
    if isinstance(v, str):
        return [v], False
    if not isinstance(v, list) or not v:
        raise ValueError("must be a string, a list of token ids, or a non-empty list of strings or of token-id "
                         f"lists, got {'an empty list' if v == [] else type(v).__name__}")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return [list(v)], False
    if all(isinstance(x, str) for x in v) or all(isinstance(x, list) for x in v):
        return list(v), True
    raise ValueError("a list must hold only token ids (one prompt), only strings or only lists of token ids "
                     "(several prompts), not a mix")


class CompletionRequest(SamplingControls, _Checked):
    _NOT_HONOURED = COMPLETION_NOT_HONOURED
    # field order matters: a field's validator sees the fields above it (n checks prompt, logprobs echo)
    model: str | None = None
    prompt: Any
    n: int | None = Field(None, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)   # default 1, as OpenAI
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)                     # extension: 0 or -1 = off
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20, strict=True)   # an int here (true is chat's)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    add_special_tokens: bool = True                           # vLLM's: BOS before a string prompt
    _prompt_list: list = PrivateAttr(default_factory=list)
    _batched: bool = PrivateAttr(default=False)

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v):
        prompts, _ = _prompts(v)
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts; at most {MAX_PROMPTS} per request")
        return v

    @field_validator("n")
    @classmethod
    def _choices(cls, v, info):
        if v is not None and "prompt" in info.data:
            k = len(_prompts(info.data["prompt"])[0])
            if k * v > MAX_CHOICES:
                raise ValueError(f"{k} prompts x n={v} = {k * v} choices; at most {MAX_CHOICES} per request")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        return stop_list(v)

    @field_validator("logprobs")
    @classmethod
    def _not_with_echo(cls, v, info):
        if v is not None and info.data.get("echo"):
            raise ValueError("echo with logprobs needs the prompt's logprobs, which this server does not "
                             "compute: leave out one of them")
        return v

    @model_validator(mode="after")
    def _normalise(self):
        self._prompt_list, self._batched = _prompts(self.prompt)     # valid: checked above
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        return self._prompt_list

    def where(self, i: int) -> str:
        """The parameter path of prompt i, for error messages."""
        return f"prompt[{i}]" if self._batched else "prompt"

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionLogprobs(BaseModel):
    """The legacy logprobs of one choice: per token its text, logprob, the top `logprobs` alternatives (text
    -> logprob, the chosen token always among them) and the character offset of its text in the choice's."""
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None   # "stop" (EOS or a stop string) or "length" (max_tokens)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None         # streamed: only on the last chunk, and only with include_usage


class TokenizeRequest(_Checked):
    """{"prompt": str} (raw text, BOS first unless add_special_tokens is false) or {"messages": [...]} (the
    chat format, images counted as the chat route would). A chat prompt always carries its own BOS:
    add_special_tokens true would add nothing, so it is refused there."""
    _NOT_HONOURED = TOKENIZE_NOT_HONOURED
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ChatTool] | None = None    # with messages: counted as the chat route tokenises them
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (text) and 'messages' (a chat)")
        if self.tools and self.messages is None:
            raise ValueError("tools go with 'messages' (a chat): a raw prompt has no tool list")
        if self.messages is not None and self.add_special_tokens:
            raise ValueError("add_special_tokens: a chat prompt already starts with BOS (the chat format puts "
                             "it there): leave it out or false")
        return self

    def image_count(self) -> int:
        return sum(p.type == "image_url" for m in self.messages or [] for p in (m.content or []))

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None   # with return_token_strs: each token's text (special tokens by name)


class DetokenizeRequest(_Checked):
    _NOT_HONOURED = {}
    model: str | None = None
    tokens: list[Any]                      # checked against the vocabulary with the index of a bad id


class DetokenizeResponse(BaseModel):
    prompt: str
