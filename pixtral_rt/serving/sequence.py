"""One request's state in the serving engine, from submission to its last token.

Life: WAITING (queued) -> PREFILL (admitted: a batch slot and the pages of its prompt held; prompt chunks
being computed) -> DECODE (one token per step; a page is added when its last one fills) -> FINISHED (pages
released). Under page pressure a PREFILL or DECODE sequence may be preempted: back to WAITING with no pages
and no slot, its delivered output kept. It is resumed by a prefill of prompt + delivered output (`prefill_len`
tokens, mostly prefix-cache hits), after which it decodes on as if nothing happened.

The host tracks counts; the token being decoded lives on the device (the model runner's per-slot buffers),
so no step waits for the host. Positions: the prompt is 0..prompt_len-1, output token i sits at position
prompt_len + i; `num_computed` counts the positions whose K/V are written by launched steps (the prefill,
then one per decode step), so once the prefill is done num_computed - prompt_len + 1 tokens are sampled.
"""
from __future__ import annotations

import enum
import functools
import hashlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
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


# Pixels of 2+ slices of this many bytes are hashed slice by slice on threads (hashlib releases the GIL): SHA-256 runs at
# ~1.3 GB/s on one core, so one 1024^2 image (3 MiB) took 2.3 ms of every image request's TTFT
_SLICE_BYTES = 1 << 19
_HASH_THREADS = max(1, min(8, os.cpu_count() or 1))


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="pixtral_rt-digest")


def _sha256(buf) -> bytes:
    return hashlib.sha256(buf).digest()


def image_digest(image) -> bytes:
    """Digest of an image's pixels (decoded uint8 (h, w, 3) or a normalised tensor) and shape: SHA-256 (a
    collision-resistant key, since cached features are shared across users; hardware-accelerated where BLAKE2b
    over copies took 5.6-6.8 ms, benchmarks/bench_host.py), fed without copying the pixels. Large images: a
    two-level SHA-256 (k slices hashed side by side, then shape + k + the slice digests), one fixed function
    of the pixels on every machine (k depends on the size only)."""
    a = np.ascontiguousarray(image.numpy() if hasattr(image, "numpy") else image)
    buf = memoryview(a.reshape(-1).view(np.uint8))
    head = repr((a.shape, a.dtype.str)).encode()
    k = min(8, len(buf) // _SLICE_BYTES)   # slices: fixed by the size (never by this machine's cores)
    if k < 2:
        h = hashlib.sha256(head)
        h.update(buf)
        return h.digest()
    step = -(-len(buf) // k)
    parts = _hash_pool().map(_sha256, [buf[i * step:(i + 1) * step] for i in range(k)])
    return hashlib.sha256(head + b"slices=%d;" % k + b"".join(parts)).digest()


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
    num_cached: int = 0                         # prompt tokens from the prefix cache at the first admission
    num_computed: int = 0                       # positions whose K/V are written (or scheduled) this admission
    prefill_len: int = 0                        # tokens this admission prefills: prompt + output delivered before
    token_cap: int = 1 << 62                    # most tokens the pool / context allows (Scheduler.add)
    preemptions: int = 0                        # times it was preempted (back to the waiting queue)
    output: list[int] = field(default_factory=list)      # delivered output tokens (no EOS)
    cancelled: bool = False
    finish_reason: str | None = None
    keys: np.ndarray | None = None              # prefix-cache keys of the prompt
    hashes: list[bytes] = field(default_factory=list)    # chained hashes of full pages of prompt (+ output) keys
    registered: int = 0                         # pages of this sequence registered in the prefix cache
    features: object = None                     # (n_img_tokens, dim) device tensor while the prompt is computed
    t_first: float = 0.0                        # when its first token was delivered (0: not yet)
    t_submit: float = 0.0                       # host clock (perf_counter) at submission
    t_enqueued: float = 0.0                     # ... when submit() handed it to the step thread (queue_ms's parts:
    t_woke: float = 0.0                         # submit's host work, the step thread's wake-up, the schedule call)
    t_admit: float = 0.0                        # ... when the scheduler admitted it
    vision_ms: float = 0.0                      # measured stages of its prompt (TokenEvent.timings)
    prefill_ms: float = 0.0
    first_token_ack: object = None              # threading.Event the consumer sets (LLMEngine.submit)
    matcher: object = None                      # grammar matcher (pixtral_rt/structured) of a constrained request

    def __post_init__(self):
        if not self.request_id:
            self.request_id = f"req-{self.id}"

    @property
    def prompt_len(self) -> int:
        return self.req.prompt_tokens

    @property
    def max_tokens(self) -> int:
        """Output tokens it may produce: max_tokens, cut to what the context and the whole pool can hold
        (a request without max_tokens runs to EOS or to that cap, then ends with finish_reason "length")."""
        return min(self.params.max_tokens, self.token_cap)

    @property
    def n_sampled(self) -> int:
        """Output tokens sampled by launched steps (delivered or still on their way to the host)."""
        return self.num_computed - self.prompt_len + 1 if self.status == Status.DECODE else len(self.output)

    def prefill_tokens(self, start: int, end: int) -> list[int]:
        """Token ids fed at positions start..end-1 of this admission's prefill (prompt, then resumed output)."""
        L = self.prompt_len
        return list(self.req.tokens[start:min(end, L)]) + self.output[max(start, L) - L:max(end, L) - L]

    def plan_prefix(self, page_size: int, merge: int = 1) -> None:
        """Prefix-cache keys and page hashes (host work, once, at submission)."""
        self.keys = token_keys(self.req, self.digests, merge)
        # the last prompt token is always recomputed (its logits give the first output token)
        self.hashes = page_hashes(self.keys, page_size, (self.prompt_len - 1) // page_size)

    def page_hashes(self, page_size: int, n_tokens: int) -> list[bytes]:
        """Chained hashes of the full pages among the first n_tokens positions (prompt keys, then output
        token ids as keys of the generated part, as in a chat's next turn); extends the cached chain."""
        keys = self.keys
        if n_tokens > self.prompt_len:
            keys = np.concatenate([keys, np.asarray(self.output[:n_tokens - self.prompt_len], dtype=np.int64)])
        out = page_hashes(keys, page_size, n_tokens // page_size, known=self.hashes)
        if len(out) > len(self.hashes):
            self.hashes = out
        return out
