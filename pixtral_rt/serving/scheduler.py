"""The scheduler: decides on the host, once per step, what the model runner does.

KV pages are taken on demand (vLLM v1 / nano-vllm style): admission needs the pages of the prompt only, and
a decoding sequence gets one more page when its last one fills. Queues: `waiting` (FIFO; preempted
sequences go back to its head) and `running` (admitted: a batch slot and pages held), kept in arrival order,
which is the priority order (oldest first). Per step:
  1. finished and cancelled sequences leave: full pages whose K/V are written registered in the prefix cache,
     pages back to the pool, slot freed;
  2. every DECODE sequence, oldest first, gets room for the position this step writes (num_computed; the
     step after a sequence's true end, launched before the host sees its EOS, is planned like any other, so
     it has its page too). A sequence that has sampled max_tokens tokens is not stepped again: it ends when
     they are delivered. When no page is free (PagePool.allocate evicts least-recently-used cached prefix
     pages first), the youngest running sequence is preempted, repeatedly, until the page fits or the one
     asking is itself the youngest (then it is the one preempted). Preempting: its full pages whose K/V are
     written and whose tokens are known (prompt, and delivered output keyed by token
     ids) are registered in the prefix cache, its pages and slot freed, and it goes back to the HEAD of
     `waiting` with its delivered output. The oldest running sequence is never preempted by another, so it
     always progresses: every request finishes;
  3. only if nothing was preempted in this step: waiting sequences are admitted in order while a slot is
     free and the pages of their prefill (prompt + delivered output, minus the longest cached prefix) fit
     with `watermark` pages left over (1% of the pool, at least 1; not applied when nothing runs), so that
     a new admission does not preempt a decoding sequence at once. The first that does not fit waits (no
     overtaking: a large request is not starved by small ones). A resumed sequence is re-prefilled from its
     prompt + delivered output: its own pages registered at preemption are normally still cached;
  4. the step = every stepped DECODE sequence (one token each) + prefill chunks of PREFILL sequences, at most
     `chunk_tokens` prefill tokens in all while anything decodes (a long image prompt cannot freeze the other
     streams for its whole prefill), or `solo_chunk_tokens` when nothing does. prefill_schedule "fifo": the
     budget goes to the PREFILL sequences in admission order (the oldest finishes first; a new prompt waits
     behind every older prefill). "fair": while anything decodes, the budget is shared out equally among
     the PREFILL sequences (water-filling: one that needs less than its share takes what it needs, the rest
     is shared among the others; shares in multiples of 16 tokens, the remainder oldest first), so a new
     prompt starts in the step after its admission and a short one is not held behind a long one's whole
     prefill; at most one prompt a step starts its vision encoding (the others wait for their turn, so
     several image prompts arriving together do not stall the decoding streams at once); solo steps stay
     "fifo".

In-flight tokens of a preempted sequence: the engine reads a step's tokens one step late (on a GPU the next
step is launched first), so when a sequence is preempted in the plan of step k, the token it sampled in step
k-1 may not be delivered yet. That report is discarded (the engine skips reports of sequences that are back
in `waiting`), and the resume prefill feeds exactly the delivered tokens, so it recomputes that token from
the same context: with sampling state step = tokens delivered (seeded sampling draws the same token), the
client sees no gap and no duplicate, only latency. Nothing else of a preempted slot is in flight: preemption
happens while planning, before its slot could be scheduled again. (Delivering that token instead would also
be consistent, since re-admission comes after the delivery, but an EOS or the max_tokens-th token would then
finish a sequence sitting in `waiting`; dropping keeps every FINISHED sequence in `running` until released.)

Refused at submission, with the counts: a prompt that cannot fit the context or the whole pool with at least
one generated token. Otherwise a request runs until EOS, max_tokens, or until prompt + output reaches what
the context or the whole pool can hold (Sequence.token_cap): then it ends with finish_reason "length".
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import ContextLengthError, RequestError
from .api import check_prompt_fits
from .kv_pages import PagePool
from .sequence import Sequence, Status


class QueueFullError(RequestError):
    """Too many requests are waiting already (HTTP 503)."""

    status = 503


@dataclass
class PrefillChunk:
    seq: Sequence
    start: int          # first prefill position of the chunk
    end: int            # one past the last

    @property
    def last(self) -> bool:
        return self.end == self.seq.prefill_len


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[PrefillChunk]
    admitted: list[Sequence]            # newly admitted this step (slots to set up)
    released: list[Sequence]            # left this step (slots to clear)
    preempted: list[Sequence] = field(default_factory=list)    # back to waiting this step (slots to clear)


PREFILL_SCHEDULES = ("fifo", "fair")
PREFILL_QUANTUM = 16          # "fair" shares in multiples of 16 tokens (an MMA tile's rows), but a prompt's last piece


def fair_shares(budget: int, needs: list[int], quantum: int = 1) -> list[int]:
    """Water-filling split of `budget` tokens among prefills needing `needs` (oldest first): each gets
    min(need, an equal share of what is left), repeatedly, so none that needs less than the share holds
    tokens back; shares in whole multiples of `quantum` (but a need's last piece), and what is left under a
    quantum each goes a quantum at a time to the oldest still wanting. With quantum 1 this is token-by-token
    round robin. sum = min(budget, sum(needs)), each share <= its need."""
    out = [0] * len(needs)
    left = budget
    open_ = [i for i, n in enumerate(needs) if n > 0]
    while left > 0 and open_:
        share = left // len(open_)
        share -= share % quantum
        if share == 0:                         # fewer quanta left than prefills: a quantum each, oldest first
            for i in open_:
                give = min(needs[i] - out[i], quantum, left)
                out[i] += give
                left -= give
            open_ = [i for i in open_ if out[i] < needs[i]]
            continue
        nxt = []
        for i in open_:
            give = min(needs[i] - out[i], share)
            out[i] += give
            left -= give
            if out[i] < needs[i]:
                nxt.append(i)
        open_ = nxt                            # a remainder under a quantum each: the branch above
    return out


class Scheduler:
    def __init__(self, pool: PagePool, max_batch: int, chunk_tokens: int = 512, solo_chunk_tokens: int = 8192,
                 max_queue: int = 1024, max_context: int | None = None, watermark: int | None = None,
                 prefill_schedule: str = "fifo"):
        if prefill_schedule not in PREFILL_SCHEDULES:
            raise ValueError(f"prefill_schedule must be one of {PREFILL_SCHEDULES}, got {prefill_schedule!r}")
        self.prefill_schedule = prefill_schedule
        self.pool, self.max_batch, self.max_context = pool, max_batch, max_context
        self.chunk_tokens, self.solo_chunk_tokens, self.max_queue = chunk_tokens, solo_chunk_tokens, max_queue
        # pages an admission must leave available while something runs: room for the running sequences'
        # next pages, so admitting is not followed by a preemption at the next page boundary
        self.watermark = max(1, pool.usable // 100) if watermark is None else watermark
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []            # arrival order (Sequence.id): oldest first
        self.free_slots = list(range(max_batch - 1, -1, -1))   # pop() gives the lowest slot
        self.preemptions = 0

    # ------------------------------------------------------------------ submission
    def check_fits(self, seq: Sequence) -> None:
        """Refuse a request whose prompt + one generated token can never fit; cap its output (token_cap) to
        what the context and the whole pool can hold."""
        P, L = self.pool.page_size, seq.prompt_len
        cap = self.pool.usable * P
        check_prompt_fits(L, P, self.pool.usable)         # the same refusal as check_admission
        if self.max_context is not None and L + 1 > self.max_context:
            raise ContextLengthError(
                f"request needs {L} prompt tokens + at least 1 generated token = {L + 1} tokens, over the "
                f"context of {self.max_context} tokens: shorten the prompt or use fewer or smaller images")
        # output token i is sampled by the step that writes position L + i - 1: m tokens need L + m - 1
        # positions of pages (no step runs past the last one), and L + m <= the context
        seq.token_cap = min(cap - L + 1, (self.max_context or 1 << 62) - L)

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
            s.status, s.slot = Status.FINISHED, -1    # a preempted one's old slot was cleared already
            released.append(s)
        P = self.pool.page_size

        # 1. room for the position each decoding sequence writes in this step, oldest first
        decode: list[Sequence] = []
        preempted: list[Sequence] = []
        for s in list(self.running):
            if s.status != Status.DECODE:                        # (WAITING: preempted in this loop)
                continue
            if s.n_sampled >= s.max_tokens:
                continue                    # its last token is computed: it finishes once delivered
            need = -(-(s.num_computed + 1) // P) - len(s.pages)
            while need > 0:
                got = self.pool.allocate([], need)
                if got is not None:
                    s.pages += got
                    break
                victim = self.running[-1]    # the youngest (never an older one: those are planned already)
                self._preempt(victim)
                preempted.append(victim)
                if victim is s:
                    break
            if s.status == Status.DECODE:
                decode.append(s)
                s.num_computed += 1

        # 2. admissions, unless pages ran short in this step
        admitted = []
        while not preempted and self.waiting and self.free_slots:
            seq = self.waiting[0]
            n = seq.prompt_len + len(seq.output)           # prefill of prompt + delivered output
            # the last prefill token is always recomputed (its logits give the next output token)
            prefix = self.pool.match(seq.page_hashes(P, n - 1))
            pages = self.pool.allocate(prefix, -(-n // P) - len(prefix), keep=self.watermark if self.running else 0)
            if pages is None:
                break
            self.waiting.popleft()
            seq.pages, seq.slot, seq.prefill_len = pages, self.free_slots.pop(), n
            seq.num_computed = len(prefix) * P
            seq.registered = len(prefix)
            seq.status = Status.PREFILL
            if not seq.preemptions:                        # usage and queue time of the first admission
                seq.num_cached = len(prefix) * P
                seq.t_admit = time.perf_counter()
            bisect.insort(self.running, seq, key=lambda x: x.id)
            admitted.append(seq)

        # 3. the step: decodes + prefill chunks under the token budget
        budget = self.chunk_tokens if decode else self.solo_chunk_tokens
        todo = [s for s in self.running if s.status == Status.PREFILL]
        needs = [s.prefill_len - s.num_computed for s in todo]
        if self.prefill_schedule == "fair" and decode:
            # one vision encoder a step at most: a prompt whose chunk would start its images' encoding waits
            # while an older one starts its own (an encoder call is ~12 ms a 1024^2 image, in every decoding
            # stream's next token); counted from a prompt's first chunk, even one ending before its first [IMG]
            starting = [i for i, s in enumerate(todo) if s.features is None and s.req.image_token_positions
                        and s.num_computed <= s.req.image_token_positions[-1]]
            for i in starting[1:]:
                needs[i] = 0
            shares = fair_shares(budget, needs, quantum=PREFILL_QUANTUM)
        else:                                          # fifo: oldest first
            shares = []
            for n in needs:
                shares.append(min(n, budget))
                budget -= shares[-1]
        prefill = []
        for s, n in zip(todo, shares):
            if n <= 0:
                continue
            prefill.append(PrefillChunk(s, s.num_computed, s.num_computed + n))
            s.num_computed += n
        for c in prefill:
            if c.last:
                c.seq.status = Status.DECODE       # its next token is sampled at the end of this step
        return StepPlan(decode, prefill, admitted, released, preempted)

    def _register(self, seq: Sequence) -> None:
        """Register in the prefix cache the sequence's full pages whose K/V are written by launched steps
        (later users are ordered behind them on the same stream) and whose tokens are known: the prompt and
        the delivered output (keys of generated tokens are their ids). A token sampled but not delivered is
        unknown here; positions past num_computed are not written yet."""
        P = self.pool.page_size
        n = min(seq.num_computed, seq.prompt_len + len(seq.output), len(seq.pages) * P)
        if n // P <= seq.registered:
            return
        hashes = seq.page_hashes(P, n)
        for i in range(seq.registered, n // P):
            self.pool.register(seq.pages[i], hashes[i])
        seq.registered = n // P

    def register_prefix(self, seq: Sequence) -> None:
        """After a step's prefill chunks were launched: register their full pages. (At release and preemption
        the pages holding generated tokens are registered too, so a chat's next turn, which re-sends the
        answer, or the resumed sequence reuses them.)"""
        self._register(seq)

    def _give_back(self, seq: Sequence) -> None:
        """Its pages to the pool (registered ones stay cached) and its batch slot to the free list."""
        self.pool.release(seq.pages)
        seq.pages = []
        self.free_slots.append(seq.slot)
        self.free_slots.sort(reverse=True)

    def _release(self, seq: Sequence) -> None:
        if seq.finish_reason != "error":        # a failed step may not have written what it was planned to
            self._register(seq)
        self._give_back(seq)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        """Running -> head of waiting: cache what is reusable, give back pages and slot (the runner clears the
        slot of each sequence in StepPlan.preempted: seq.slot keeps its old value until the re-admission)."""
        self._register(seq)
        self._give_back(seq)
        self.running.remove(seq)
        seq.registered, seq.num_computed, seq.prefill_len = 0, 0, 0
        seq.features = None                 # recomputed (or from the runner's feature cache) when resumed
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)
