"""One request's state in the serving engine, from submission to its last token.

Life: WAITING (queued) -> PREFILL (admitted: pages and a batch slot held; prompt chunks being computed)
-> DECODE (one token per step) -> FINISHED (pages released). The host tracks counts; the token being
decoded lives on the device (the model runner's per-slot buffers), so no step waits for the host.
"""
from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..chat import EncodedRequest
from ..sampling import SamplingParams
from .kv_pages import page_hashes
from .outputs import TokenEvent


class Status(enum.Enum):
    WAITING = 0
    PREFILL = 1
    DECODE = 2
    FINISHED = 3


_ids = itertools.count()


def image_digest(image) -> bytes:
    """Digest of an image's pixels (decoded uint8 (h, w, 3) or a normalised tensor) and shape: SHA-256 (a
    collision-resistant key, since cached features are shared across users; hardware-accelerated: 2.3 ms for
    a 1024^2 image where BLAKE2b over copies took 5.6-6.8 ms, benchmarks/bench_host.py), fed without copying the pixels."""
    a = np.ascontiguousarray(image.numpy() if hasattr(image, "numpy") else image)
    h = hashlib.sha256(repr((a.shape, a.dtype.str)).encode())
    h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.digest()


def token_keys(req: EncodedRequest, digests: list[bytes], merge: int = 1) -> np.ndarray:
    """(T,) int64 prefix-cache keys: token ids, with the k-th [IMG] token of image i replaced by a negative
    number derived from (digest_i, k) (token ids are >= 0, so text never collides with images)."""
    keys = np.asarray(req.tokens, dtype=np.int64).copy()
    pos = np.asarray(req.image_token_positions, dtype=np.int64)
    if len(pos):
        # image i owns consecutive runs of [IMG] positions, in prompt order: split by each image's count
        counts = [(r // merge) * (c // merge) for r, c in req.patch_grids]
        start = 0
        for d, n in zip(digests, counts):
            base = int.from_bytes(d[:7], "little")
            keys[pos[start:start + n]] = -(1 + ((base + np.arange(n, dtype=np.int64)) & ((1 << 62) - 1)))
            start += n
    return keys



@dataclass(eq=False)          # identity: sequences are compared and looked up by object, never by value
class Sequence:
    req: EncodedRequest
    params: SamplingParams
    on_output: Callable[[TokenEvent], None]
    logprobs: int | None = None                 # None: off; k: chosen token's logprob + k top_logprobs
    digests: list[bytes] = field(default_factory=list)   # per image, prompt order
    request_id: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    pages: list[int] = field(default_factory=list)       # block table
    slot: int = -1                              # row of the runner's per-slot device state
    num_cached: int = 0                         # prompt tokens whose K/V came from the prefix cache
    num_computed: int = 0                       # prompt tokens whose K/V are in the cache (or scheduled)
    output: list[int] = field(default_factory=list)      # delivered output tokens (no EOS)
    cancelled: bool = False
    finish_reason: str | None = None
    keys: np.ndarray | None = None              # prefix-cache keys of the prompt
    hashes: list[bytes] = field(default_factory=list)    # chained hashes of the prompt's full pages
    registered: int = 0                         # pages of this sequence registered in the prefix cache
    features: object = None                     # (n_img_tokens, dim) device tensor while the prompt is computed
    t_first: float = 0.0                        # when its first token was delivered (0: not yet)
    t_submit: float = 0.0                       # host clock (perf_counter) at submission
    t_admit: float = 0.0                        # ... when the scheduler admitted it
    vision_ms: float = 0.0                      # measured stages of its prompt (TokenEvent.timings)
    prefill_ms: float = 0.0

    def __post_init__(self):
        if not self.request_id:
            self.request_id = f"req-{self.id}"

    @property
    def prompt_len(self) -> int:
        return self.req.prompt_tokens

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    def plan_prefix(self, page_size: int, merge: int = 1) -> None:
        """Prefix-cache keys and page hashes (host work, once, at submission)."""
        self.keys = token_keys(self.req, self.digests, merge)
        # the last prompt token is always recomputed (its logits give the first output token)
        self.hashes = page_hashes(self.keys, page_size, (self.prompt_len - 1) // page_size)

    def pages_needed(self, page_size: int) -> int:
        # + 1 token: the step after the last one is launched before the host knows the sequence ended
        return -(-(self.prompt_len + self.max_tokens + 1) // page_size)
