"""A validated request's sampling fields -> one SamplingParams per choice, for every route that generates
(chat completions, text completions): both request models carry the same field names."""
from __future__ import annotations

import secrets

from ..sampling import SamplingParams


def sampling_params(request, max_tokens: int) -> list[SamplingParams]:
    """One SamplingParams per choice. Choice i uses seed + i; without a seed each choice draws its own, so
    sampled answers differ between requests as with OpenAI (greedy ones do not depend on it). Seeds are
    taken mod 2^63 to fit the sampler's int64, which keeps their low 32 bits, the only ones it hashes."""
    r = request
    return [SamplingParams(temperature=1.0 if r.temperature is None else r.temperature,
                           top_p=1.0 if r.top_p is None else r.top_p,
                           top_k=max(0, r.top_k or 0), max_tokens=max_tokens, stop=tuple(r.stop),
                           seed=(r.seed + i) % 2**63 if r.seed is not None else secrets.randbits(32))
            for i in range(r.n or 1)]
