"""The sampling controls both generating routes accept (chat completions and text completions), as one
pydantic mixin: presence_penalty and frequency_penalty (OpenAI's, [-2, 2]), logit_bias (OpenAI's: token id
as a string -> [-100, 100], at most 300 entries), and vLLM's repetition_penalty (> 0, 1 = off), min_tokens
and stop_token_ids. Null means not set. Token ids are checked against the vocabulary by the engine's
admission (serving/api.py check_admission), which knows it; min_tokens against max_tokens when the request's
SamplingParams are built (server/sampling_args.py)."""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field, field_validator

from ..sampling import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS


def _token_id(key) -> int | None:
    """A logit_bias key ("1234", or 1234 from a Python client) as a token id, or None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


class SamplingControls(BaseModel):
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[int, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)

    @field_validator("repetition_penalty")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number > 0 (1 = off), got {v}")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, v: Any):
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ValueError(f"must be an object mapping token ids to biases, got {type(v).__name__}")
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(v)} entries; at most {MAX_LOGIT_BIAS}")
        out = {}
        for key, bias in v.items():
            tid = _token_id(key)
            if tid is None:
                raise ValueError(f"key {key!r} is not a token id (a non-negative integer, as a string)")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key!r} must be a number in [-100, 100], got {bias!r:.40}")
            out[tid] = float(bias)
        return out

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _ids(cls, v: Any):
        if isinstance(v, list):
            for i, t in enumerate(v):
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"[{i}] = {t!r:.40} is not a token id (a non-negative integer)")
        return v
