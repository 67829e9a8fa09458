"""One chat completion in the engine: its n choices, their token events turned into text deltas (and, for a
request with tools, tool-call deltas: pixtral_rt/structured/tool_calls.py), logprobs and usage. Used by
pixtral_rt.serve for both streamed and whole answers.

Threads: the engine calls each choice's on_output from its step-loop thread; the callback only hands the
event to the asyncio loop (call_soon_threadsafe -> asyncio.Queue). Detokenising, stop strings (TextStream)
and logprob strings happen here, on the consumer side, so they never slow a decode step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from dataclasses import dataclass

from .protocol import PromptTokensDetails, TokenLogprob, TopLogprob, Usage
from ..serving.detokenize import TextStream
from ..structured.tool_calls import ToolCallDelta, ToolCallStream

_ABORT = object()  # queued by abort(): wakes the consumer even if the engine sends nothing more
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


class Aborted(Exception):
    """The request was cancelled before it finished (server shutting down)."""


class GenerationFailed(Exception):
    """The engine ended a choice with finish_reason "error"; the message is meant for the client."""


class LoopCallback:
    """A choice's on_output: called from the engine's thread, it hands the event to the asyncio loop
    (call_soon_threadsafe -> the run's queue). `loop` and `put` let a caller holding many events for the same
    loop hand them over in one call_soon_threadsafe (serving/engine_client.py: one wake-up of the loop per
    batch of events from the engine process instead of one per token)."""
    __slots__ = ("loop", "_queue", "_index", "before")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, before=None):
        self.loop, self._queue, self._index = loop, queue, index
        self.before = before               # optional f(event), run on the engine's thread first

    def __call__(self, event) -> None:
        if self.before is not None:
            self.before(event)
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, (self._index, event))
        except RuntimeError:  # the event loop is closed (server gone): nobody is waiting for this
            pass

    def put(self, event) -> None:
        """On the loop's thread: enqueue (what __call__ schedules there)."""
        if self.before is not None:
            self.before(event)
        self._queue.put_nowait((self._index, event))


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprobs, as OpenAI reports them: a token holding part of a
    character has its exact bytes, and its text shows U+FFFD for the missing part."""

    def __init__(self, tokenizer):
        raw = tokenizer.instruct_tokenizer.tokenizer
        if hasattr(raw, "id_to_byte_piece"):  # tekken: byte-level BPE
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
            self._bytes = lambda i: raw.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)
        else:  # SentencePiece (Pixtral-Large): "\u2581" marks a space, <0xNN> is one raw byte
            def sentencepiece(i: int) -> bytes:
                piece = raw.id_to_piece(i)
                m = _BYTE_PIECE.fullmatch(piece)
                return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
            self._bytes = sentencepiece
        self._cache: dict[int, tuple[str, list[int]]] = {}  # bounded by the vocabulary

    def of(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            b = self._bytes(token_id)
            hit = self._cache[token_id] = (b.decode("utf-8", errors="replace"), list(b))
        return hit

    def item(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        text, b = self.of(token_id)
        return TokenLogprob(token=text, logprob=logprob, bytes=b, top_logprobs=[self._top(t, lp) for t, lp in top])

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text, b = self.of(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=b)


@dataclass
class Delta:
    """What one engine event added to choice `index`."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    tool_calls: list[ToolCallDelta] | None = None


class _Choice:
    def __init__(self, tokenizer, stop, tool_calls: bool = False):
        # with tools offered, the answer goes through the tool-call parser (which keeps its text content in a
        # TextStream of its own); otherwise it is text
        self.calls = ToolCallStream(tokenizer, stop=stop) if tool_calls else None
        self.text = None if tool_calls else TextStream(tokenizer, stop=stop)
        self.handle = None
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.last_token_at: float | None = None

    @property
    def stopped(self) -> bool:
        return (self.calls or self.text).stopped

    @property
    def content(self) -> str:
        return (self.calls or self.text).text

    def add(self, token_ids) -> tuple[str, list[ToolCallDelta]]:
        return self.calls.add(token_ids) if self.calls is not None else (self.text.add(token_ids), [])

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self.calls.finish() if self.calls is not None else (self.text.finish(), [])


class CompletionRun:
    """The n choices of one request. Create on the event loop; submit(); iterate deltas(); close() always."""

    def __init__(self, engine, token_text: TokenText, metrics, *, n: int, stop, logprobs: int | None,
                 arrived: float, on_close=None, tool_calls: bool = False):
        self.engine, self.token_text, self.metrics = engine, token_text, metrics
        self.logprobs, self.arrived, self.on_close = logprobs, arrived, on_close
        self.choices = [_Choice(engine.tokenizer, stop, tool_calls) for _ in range(n)]
        self.prompt_tokens = self.cached_tokens = 0
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held = None                               # an item taken from the queue, not yet handled
        self._abort_reason = ""
        self._first_token_seen = False

    def submit(self, req, params: list) -> None:
        """One engine request per choice. If the engine refuses one (queue full, too long), those already
        submitted are cancelled and the error propagates."""
        self.prompt_tokens = req.prompt_tokens
        try:
            for i, (choice, p) in enumerate(zip(self.choices, params)):
                choice.handle = self.engine.submit(req, p, self._callback(i), logprobs=self.logprobs)
        except BaseException:
            self.close()
            raise

    def _callback(self, index: int) -> "LoopCallback":
        return LoopCallback(self._loop, self._queue, index)

    def close(self) -> None:
        """Cancel every unfinished choice (its KV pages are freed at the next step). Idempotent."""
        for c in self.choices:
            if c.handle is not None and c.finish_reason is None:
                c.handle.cancel()
        if self.on_close is not None:
            self.on_close(self)
            self.on_close = None

    def abort(self, reason: str) -> None:
        """Cancel and make deltas() raise Aborted(reason) now (shutdown). Call on the event loop's thread."""
        self._abort_reason = reason
        self.close()
        self._queue.put_nowait(_ABORT)

    async def deltas(self):
        """Yields a Delta per engine event until every choice has finished."""
        open_choices = len(self.choices)
        while open_choices:
            item, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
            if item is _ABORT:
                raise Aborted(self._abort_reason)
            index, ev = self._coalesce(*item)
            c = self.choices[index]
            if c.finish_reason is not None:  # e.g. the "abort" that follows our own cancel at a stop string
                continue
            self._observe_latency(c, len(ev.token_ids))
            c.n_tokens += len(ev.token_ids)
            self.cached_tokens = max(self.cached_tokens, ev.cached_tokens)
            text, calls = c.add(ev.token_ids)
            finish = None
            if c.stopped:
                c.handle.cancel()
                finish = "stop"
            elif ev.finish_reason == "error":
                raise GenerationFailed(ev.error or "generation failed")
            elif ev.finish_reason == "abort":
                raise Aborted("the request was cancelled by the server")
            elif ev.finish_reason is not None:
                more, more_calls = c.finish()
                text, calls = text + more, calls + more_calls
                finish = ev.finish_reason
                if finish == "stop" and c.calls is not None and c.calls.calls:
                    finish = "tool_calls"           # the answer ended (EOS / grammar complete) with calls
            if finish is not None:
                c.finish_reason = finish
                open_choices -= 1
            yield Delta(index, text, self._logprob_items(ev), finish, calls or None)

    def _coalesce(self, index: int, ev):
        """Merge the events of this choice that are already queued behind `ev` into one (a client or an event
        loop that fell behind catches up with one chunk instead of one per token: the per-chunk cost, not the
        engine, limits a server with many streams). Stops at an event of another choice or an abort, so
        order is kept."""
        merged = None
        while ev.finish_reason is None:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if nxt is _ABORT or nxt[0] != index:
                self._held = nxt                        # handled first on the next round
                break
            nev = nxt[1]
            if merged is None:
                merged = ev = dataclasses.replace(ev, token_ids=list(ev.token_ids),
                                                  logprobs=None if ev.logprobs is None else list(ev.logprobs),
                                                  top_logprobs=None if ev.top_logprobs is None
                                                  else list(ev.top_logprobs))
            ev.token_ids += nev.token_ids
            if ev.logprobs is not None and nev.logprobs is not None:
                ev.logprobs += nev.logprobs
            if ev.top_logprobs is not None and nev.top_logprobs is not None:
                ev.top_logprobs += nev.top_logprobs
            ev.finish_reason, ev.error = nev.finish_reason, nev.error
            ev.cached_tokens = max(ev.cached_tokens, nev.cached_tokens)
        return index, ev

    def _observe_latency(self, c: _Choice, n_new: int) -> None:
        if not n_new:
            return
        now = time.monotonic()
        if not self._first_token_seen:
            self._first_token_seen = True
            self.metrics.ttft.observe(now - self.arrived)
        if c.last_token_at is not None:
            gap = (now - c.last_token_at) / n_new  # tokens that arrive together share the gap
            for _ in range(n_new):
                self.metrics.itl.observe(gap)
        c.last_token_at = now

    def _logprob_items(self, ev) -> list[TokenLogprob] | None:
        if self.logprobs is None:
            return None
        tops = ev.top_logprobs or [[] for _ in ev.token_ids]
        return [self.token_text.item(t, lp, top) for t, lp, top in zip(ev.token_ids, ev.logprobs or [], tops)]

    def usage(self) -> Usage:
        completion = sum(c.n_tokens for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))
