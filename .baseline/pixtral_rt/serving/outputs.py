"""What the step loop hands to a request's consumer, one event per step in which the request advanced.

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
    # temperature / top-k / top-p), present when the request asked for logprobs
    logprobs: list[float] | None = None
    # for each new token, the `top_logprobs` most likely (token_id, logprob) pairs, best first
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None   # "stop" (EOS), "length" (max_tokens), "abort" (cancelled), "error"
    error: str | None = None           # with finish_reason "error": a one-line message for the client
    prompt_tokens: int = 0             # set on every event
    cached_tokens: int = 0             # prompt tokens served from the prefix cache (set on every event)
    # on the first event of a request (its first token, or its end if it never got one): what its prompt
    # took, in ms: queue_ms (submission -> admission, host clock), vision_ms (the vision encoder on this
    # request's images, 0 when none or all cached), prefill_ms (its prompt chunks, which the steps share
    # with other sequences' work); device-timed (CUDA events) on a GPU
    timings: dict | None = None
