"""The scheduler: decides on the host, once per step, what the model runner does.

Queues: `waiting` (FIFO) and `running` (admitted: pages and a batch slot held). Per step:
  1. finished and cancelled sequences leave: pages back to the pool (prefix pages stay cached), slot freed;
  2. waiting sequences are admitted in arrival order while a slot is free and their pages fit: the longest
     cached prefix is taken with references, the rest (prompt + max_tokens + 1 tokens, rounded up to pages)
     allocated now, so a running sequence can never run out of pages. The first that does not fit waits
     (no overtaking: a large request is not starved by small ones);
  3. the step = every DECODE sequence (one token each) + prefill chunks of PREFILL sequences in admission
     order, at most `chunk_tokens` prompt tokens in all while anything decodes (a long image prompt cannot
     freeze the other streams for its whole prefill), or `solo_chunk_tokens` when nothing decodes.
A request that could never fit (more pages than the pool has) is refused at submission with the counts.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..errors import ContextLengthError, RequestError
from .kv_pages import PagePool, page_hashes
from .sequence import Sequence, Status


class QueueFullError(RequestError):
    """Too many requests are waiting already (HTTP 503)."""

    status = 503


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int          # first prompt position of the chunk
    end: int            # one past the last

    @property
    def last(self) -> bool:
        return self.end == self.seq.prompt_len


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[PrefillChunk]
    admitted: list[Sequence]            # newly admitted this step (slots to set up)
    released: list[Sequence]            # left this step (slots to clear)


class Scheduler:
    def __init__(self, pool: PagePool, max_batch: int, chunk_tokens: int = 512, solo_chunk_tokens: int = 8192,
                 max_queue: int = 1024):
        self.pool, self.max_batch = pool, max_batch
        self.chunk_tokens, self.solo_chunk_tokens, self.max_queue = chunk_tokens, solo_chunk_tokens, max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch - 1, -1, -1))   # pop() gives the lowest slot

    # ------------------------------------------------------------------ submission
    def check_fits(self, seq: Sequence) -> None:
        P = self.pool.page_size
        need = seq.pages_needed(P)
        if need > self.pool.usable:
            cap = self.pool.usable * P - 1
            raise ContextLengthError(
                f"request needs {seq.prompt_len} prompt tokens + {seq.max_tokens} max_tokens = "
                f"{seq.prompt_len + seq.max_tokens} tokens of KV cache, but the whole cache holds {cap} tokens: "
                "lower max_tokens or shorten the prompt")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the server is at capacity: {len(self.waiting)} requests are waiting already; "
                                 "retry later")
        self.waiting.append(seq)

    # ------------------------------------------------------------------ per step
    def schedule(self) -> StepPlan:
        released = [s for s in self.running if s.status == Status.FINISHED or s.cancelled]
        for s in released:
            self._release(s)
        self.running = [s for s in self.running if s not in released] if released else self.running
        for s in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(s)
            s.status = Status.FINISHED
            released.append(s)
        admitted = []
        P = self.pool.page_size
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            prefix = self.pool.match(seq.hashes)
            pages = self.pool.allocate(prefix, seq.pages_needed(P) - len(prefix))
            if pages is None:
                break
            self.waiting.popleft()
            seq.pages, seq.slot = pages, self.free_slots.pop()
            seq.num_cached = seq.num_computed = len(prefix) * P
            seq.registered = len(prefix)
            seq.status = Status.PREFILL
            seq.t_admit = time.perf_counter()
            self.running.append(seq)
            admitted.append(seq)

        decode = [s for s in self.running if s.status == Status.DECODE]
        budget = self.chunk_tokens if decode else self.solo_chunk_tokens
        prefill = []
        for s in self.running:
            if budget <= 0:
                break
            if s.status != Status.PREFILL:
                continue
            n = min(budget, s.prompt_len - s.num_computed)
            prefill.append(PrefillChunk(s, s.num_computed, s.num_computed + n))
            s.num_computed += n
            budget -= n
        for c in prefill:
            if c.last:
                c.seq.status = Status.DECODE       # its first token is sampled at the end of this step
        return StepPlan(decode, prefill, admitted, released)

    def register_prefix(self, seq: Sequence) -> None:
        """Register the sequence's full prompt pages whose K/V are written (after its chunks were launched:
        later users are ordered behind them on the same stream)."""
        P = self.pool.page_size
        upto = min(len(seq.hashes), seq.num_computed // P)
        for i in range(seq.registered, upto):
            self.pool.register(seq.pages[i], seq.hashes[i])
        seq.registered = max(seq.registered, upto)

    def register_output(self, seq: Sequence) -> None:
        """At the end of a sequence: register the full pages that also hold its generated tokens, so the next
        turn of a chat (which re-sends the answer) reuses them. Keys of generated tokens are their ids.
        Only positions below the last output token are certain to be in the cache (the last one is written
        by the step after it, which may not have run)."""
        P = self.pool.page_size
        if not seq.output or seq.keys is None or not seq.pages:
            return
        keys = np.concatenate([seq.keys, np.asarray(seq.output, dtype=np.int64)])
        n = (seq.prompt_len + len(seq.output) - 1) // P
        if n <= seq.registered:
            return
        hashes = page_hashes(keys, P, n, known=seq.hashes)
        for i in range(seq.registered, n):
            self.pool.register(seq.pages[i], hashes[i])
        seq.registered = n

    def _release(self, seq: Sequence) -> None:
        if seq.status != Status.WAITING and seq.num_computed >= seq.prompt_len:
            self.register_output(seq)
        self.pool.release(seq.pages)
        seq.pages = []
        self.free_slots.append(seq.slot)
        self.free_slots.sort(reverse=True)
        seq.status = Status.FINISHED

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)
