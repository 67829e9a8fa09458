"""What the engine hands back: TokenEvent, one per step in which a request advanced (the step loop's
callbacks), and GenerationResult, one whole request (LLMEngine.stream / generate, Engine, the CLI).

The callback given to LLMEngine.submit receives TokenEvents from the step-loop thread; it must return at
once (push onto a queue: `loop.call_soon_threadsafe(q.put_nowait, ev)` for asyncio, `queue.Queue.put` for
threads). After an event with `finish_reason` set, no more events come for that request.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    token_ids: list[int] = field(default_factory=list)     # new output tokens (EOS is never included)
    # logprobs of each new token under the model's raw distribution (log_softmax of the logits, before
    # temperature / top-k / top-p and the sampling controls (penalties, logit_bias, min_tokens); for a
    # constrained request after its grammar's mask, as in vLLM: disallowed tokens -inf), present when the
    # request asked for logprobs
    logprobs: list[float] | None = None
    # for each new token, the `top_logprobs` most likely (token_id, logprob) pairs, best first
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None   # "stop" (EOS or a stop_token_ids id, neither in token_ids; or a
                                       # constrained request's grammar complete), "length"
                                       # (max_tokens), "abort" (cancelled), "error"
    error: str | None = None           # with finish_reason "error": a one-line message for the client
    prompt_tokens: int = 0             # set on every event
    cached_tokens: int = 0             # prompt tokens served from the prefix cache (set on every event)
    # on the first event of a request (its first token, or its end if it never got one): what its prompt
    # took, in ms: queue_ms (submission -> admission, host clock; its parts queue_submit_ms, queue_wake_ms,
    # queue_schedule_ms), vision_ms (the vision encoder on this
    # request's images, 0 when none or all cached), prefill_ms (its prompt chunks, which the steps share
    # with other sequences' work); device-timed (CUDA events) on a GPU
    timings: dict | None = None


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""          # "stop" (EOS or stop string), "length", "interrupted", "abort", "error"
    prompt_tokens: int = 0
    image_patches: int = 0
    n_images: int = 0
    timings: dict = field(default_factory=dict)
    logprobs: list[float] = field(default_factory=list)   # of each output token, when asked for
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
