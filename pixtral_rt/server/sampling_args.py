"""A validated request's sampling fields -> one SamplingParams per choice, for every route that generates
(chat completions, text completions): both request models carry the same field names (the sampling
controls: sampling_protocol.SamplingControls)."""
from __future__ import annotations

import secrets

from ..sampling import SamplingParams
from .protocol import OpenAIError


def sampling_params(request, max_tokens: int, constraint=None) -> list[SamplingParams]:
    """One SamplingParams per choice. Choice i uses seed + i; without a seed each choice draws its own, so
    sampled answers differ between requests as with OpenAI (greedy ones do not depend on it). Seeds are
    taken mod 2^63 to fit the sampler's int64, which keeps their low 32 bits, the only ones it hashes.
    OpenAIError 400 naming the field when the settings do not fit together (min_tokens over max_tokens).
    constraint: every choice's grammar (response_format / tools: server/constraints.py), or None."""
    r = request
    controls = dict(presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
                    logit_bias=r.logit_bias or {}, min_tokens=r.min_tokens or 0,
                    stop_token_ids=tuple(r.stop_token_ids or ()))
    if controls["min_tokens"] > max_tokens:
        raise OpenAIError(400, f"min_tokens: {controls['min_tokens']} is more than max_tokens ({max_tokens}: "
                               "what the request allows, or the context leaves)", param="min_tokens",
                          code="invalid_value")
    return [SamplingParams(temperature=1.0 if r.temperature is None else r.temperature,
                           top_p=1.0 if r.top_p is None else r.top_p,
                           top_k=max(0, r.top_k or 0), max_tokens=max_tokens, stop=tuple(r.stop),
                           seed=(r.seed + i) % 2**63 if r.seed is not None else secrets.randbits(32),
                           constraint=constraint, **controls)
            for i in range(r.n or 1)]
