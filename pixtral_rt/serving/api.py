"""The interface the HTTP server and the CLI drive, and the admission checks every implementation applies.

Two implementations, one Protocol (tests/test_engine_api.py checks the signatures):
    LLMEngine     (llm_engine.py)    the step loop in this process
    EngineClient  (engine_client.py) the same engine in a process of its own
Both call `check_admission` first in `submit`, so a bad request is refused with the same error, raised
synchronously, whichever runs. What each call means: serving/API.md.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from ..chat import EncodedRequest
from ..errors import ContextLengthError, RequestError
from ..images import DEFAULT_LIMITS, ImageLimits
from ..sampling import SamplingParams
from .outputs import TokenEvent

# top_logprobs the model runner computes per token (its out buffers are this wide)
MAX_TOP_LOGPROBS = 20


@runtime_checkable
class RequestHandle(Protocol):
    request_id: str

    def cancel(self) -> None: ...


@runtime_checkable
class ServingEngine(Protocol):
    args: Any                  # PixtralArgs
    tokenizer: Any             # mistral_common MistralTokenizer
    info: dict
    max_context: int
    max_images: int
    eos_id: int
    ready: bool

    def encode(self, messages, max_tokens: int, image_limits: ImageLimits = DEFAULT_LIMITS,
               tools: list | None = None) -> EncodedRequest: ...

    def submit(self, req: EncodedRequest, params: SamplingParams, on_output: Callable[[TokenEvent], None],
               logprobs: int | None = None, request_id: str = "") -> RequestHandle: ...

    def metrics(self) -> dict: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


def check_prompt_fits(prompt_tokens: int, page_size: int, usable_pages: int) -> None:
    """ContextLengthError (with the counts) unless the prompt + one generated token fit the whole KV cache:
    pages come on demand as a request generates (Scheduler), so max_tokens reserves nothing."""
    if -(-(prompt_tokens + 1) // page_size) > usable_pages:
        L = prompt_tokens
        raise ContextLengthError(
            f"request needs {L} prompt tokens + at least 1 generated token = {L + 1} tokens of KV cache, "
            f"but the whole cache holds {usable_pages * page_size} tokens: shorten the prompt or use fewer or "
            "smaller images")


def check_admission(req: EncodedRequest, params: SamplingParams, logprobs: int | None, page_size: int,
                    usable_pages: int, vocab: int | None = None) -> None:
    """Refuse, before anything is queued, a request no engine state could ever serve: top_logprobs outside
    0..MAX_TOP_LOGPROBS (ValueError), a logit_bias or stop_token_ids id outside the model's vocabulary
    (RequestError naming it: the sampler would write out of bounds), or a prompt (+ one generated token)
    over the whole KV cache (ContextLengthError, with the counts; pages come on demand, so max_tokens
    reserves nothing)."""
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {logprobs}")
    if vocab is not None:
        try:
            params.check_vocab(vocab)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    check_prompt_fits(req.prompt_tokens, page_size, usable_pages)
