"""Compiled constraints and per-sequence matchers on llguidance.

    check_constraint(c, tokenizer)                 # server, at request time: ConstraintError (400) if c cannot
                                                   # compile; compiles into the cache (repeat schemas are free)
    m = make_matcher(c, tokenizer, vocab_size)     # engine: one per constrained sequence
    m.fill_bitmask(row)                            # row (ceil(vocab_size / 32),) int32: bit v & 31 of word
                                                   # v >> 5 set = token v allowed
    m.accept(token)                                # advance; ValueError naming a token outside the mask
    m.is_stopped()                                 # complete, nothing more allowed: end with "stop"
    fill_bitmasks([m0, m1, ...], out)              # out (n, W) int32: all of a step's masks in one call,
                                                   # on llguidance's thread pool

A grammar is compiled once per (tokenizer, Constraint) into a template LLMatcher; each sequence gets a
deep copy of it, which shares the compiled grammar and lexer (measured: ~20 us, against 1-5 ms to compile a
tool-call grammar on the development CPU: benchmarks/bench_structured.py). The llguidance tokenizer is
built once per tokenizer (~0.6 s for tekken; warm_up() does it at start-up, off the request path).

EOS (the tokenizer's eos id) is allowed whenever the grammar can end; llguidance adds it itself. Ids past
the tokenizer's n_words (a model vocab larger than its tokenizer's) are never allowed.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

from ..errors import ConstraintError
from .constraint import Constraint
from .grammar import EMPTY_PARAMETERS, JSON_OPTIONS, lark_for
from .vocab import Vocab, vocab_of

try:
    import llguidance as llg
except ImportError:  # pragma: no cover - the serve extra installs it
    llg = None

CACHE_SIZE = 512                    # compiled constraints kept per process (LRU)


def _need_llguidance() -> None:
    if llg is None:
        raise ImportError("structured output needs llguidance: pip install -e '.[serve]' (or pip install llguidance)")


class _LLWrapper:
    """What llguidance.TokenizerWrapper reads: tokens (bytes), special ids, EOS / BOS, and a tokenize call."""

    def __init__(self, v: Vocab):
        self.tokens, self.special_token_ids = v.tokens, v.special_ids
        self.eos_token_id, self.bos_token_id = v.eos_id, v.bos_id
        self._encode = v.encode

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text)


class _Compiled:
    """One tokenizer's llguidance state: its LLTokenizer and the LRU of compiled template matchers."""

    def __init__(self, tokenizer):
        _need_llguidance()
        self.vocab = vocab_of(tokenizer)
        self.ll_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_LLWrapper(self.vocab)))
        self.templates: collections.OrderedDict[Constraint, object] = collections.OrderedDict()
        self.compile_s: dict[Constraint, float] = {}
        self.lock = threading.Lock()

    def template(self, c: Constraint):
        with self.lock:
            hit = self.templates.get(c)
            if hit is not None:
                self.templates.move_to_end(c)
                return hit
        _check_schemas(c, self.ll_tokenizer)      # a clear error naming the bad schema, before the whole
        t0 = time.perf_counter()
        m = llg.LLMatcher(self.ll_tokenizer, llg.LLMatcher.grammar_from_lark(lark_for(c, self.vocab)), log_level=0)
        if m.is_error():
            raise ConstraintError(f"the output constraint cannot be compiled: {m.get_error()}", _param_of(c))
        with self.lock:
            self.templates[c] = m
            self.compile_s[c] = time.perf_counter() - t0
            while len(self.templates) > CACHE_SIZE:
                old, _ = self.templates.popitem(last=False)
                self.compile_s.pop(old, None)
        return m


def _param_of(c: Constraint) -> str:
    return "tools" if c.kind == "tool_calls" and not c.schema else "response_format"


def _check_schemas(c: Constraint, ll_tokenizer) -> None:
    """Each JSON schema of `c` compiled alone: ConstraintError naming the request field of the first bad one."""
    schemas = []
    if c.schema:
        where = "response_format.json_schema.schema" if c.kind != "json_object" else "response_format"
        schemas.append((where, c.schema_dict()))
    for i, t in enumerate(c.tool_list()):
        if not c.function or t["name"] == c.function:
            schemas.append((f"tools[{i}].function.parameters", t.get("parameters") or EMPTY_PARAMETERS))
    for where, schema in schemas:
        if not isinstance(schema, dict):
            raise ConstraintError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}", where)
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise ConstraintError(f"{where}: not a JSON schema this server can enforce: {exc}", where) from exc
        err = llg.LLMatcher.validate_grammar(grammar, ll_tokenizer)
        if err:
            raise ConstraintError(f"{where}: not a JSON schema this server can enforce: {err}", where)


_STATE: "dict[int, tuple[object, _Compiled]]" = {}
_STATE_LOCK = threading.Lock()


def _compiled(tokenizer) -> _Compiled:
    # keyed by id() and holding the tokenizer itself, so an id is never reused while its entry lives
    with _STATE_LOCK:
        hit = _STATE.get(id(tokenizer))
        if hit is None:
            hit = _STATE[id(tokenizer)] = (tokenizer, _Compiled(tokenizer))
        return hit[1]


def warm_up(tokenizer) -> None:
    """Build the tokenizer's llguidance state now (a load step), so the first constrained request does not."""
    _compiled(tokenizer)


def check_constraint(c: Constraint, tokenizer) -> None:
    """Compile `c` (cached); ConstraintError (a PixtralInputError: HTTP 400) naming the bad part otherwise."""
    _compiled(tokenizer).template(c)


def compile_seconds(c: Constraint, tokenizer) -> float | None:
    """How long compiling `c` took, if it is in the cache (benchmarks, logs)."""
    return _compiled(tokenizer).compile_s.get(c)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, ll_matcher, vocab: Vocab, vocab_size: int):
        self._m, self.vocab, self.vocab_size = ll_matcher, vocab, vocab_size
        self.words = (vocab_size + 31) // 32              # the bitmask row's width
        self._own_words = (vocab.n_words + 31) // 32      # what llguidance writes
        if vocab_size < vocab.n_words:
            raise ValueError(f"the model's vocab_size {vocab_size} is smaller than its tokenizer's "
                             f"{vocab.n_words} tokens")

    def fill_bitmask(self, row: np.ndarray) -> None:
        if row.dtype != np.int32 or row.shape != (self.words,) or not row.flags.c_contiguous:
            raise ValueError(f"bitmask row must be contiguous int32 of shape ({self.words},), got "
                             f"{row.dtype} {row.shape}")
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, self._own_words * 4)
        row[self._own_words:] = 0                         # ids the tokenizer does not have: never allowed

    def accept(self, token: int) -> None:
        token = int(token)
        if not 0 <= token < self.vocab.n_words:
            raise ValueError(f"token {token} is outside the tokenizer's {self.vocab.n_words} ids: the mask "
                             "never allows it")
        if self._m.try_consume_tokens([token]) != 1:      # leaves the matcher as it was on refusal
            raise ValueError(f"token {token} ({self.vocab.tokens[token]!r}) is not allowed by the grammar here"
                             + (f": {self._m.get_error()}" if self._m.is_error() else ""))

    def is_stopped(self) -> bool:
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is complete (EOS allowed), though the grammar may allow more."""
        return self._m.is_accepting()


def make_matcher(c: Constraint, tokenizer, vocab_size: int) -> Matcher:
    """A fresh matcher of `c` at its start (the grammar compiled once per process and constraint)."""
    comp = _compiled(tokenizer)
    return Matcher(comp.template(c).deep_copy(), comp.vocab, vocab_size)


_EXECUTOR = None


def fill_bitmasks(matchers: list[Matcher], out: np.ndarray) -> None:
    """out[i] = the mask of matchers[i], for all of them at once on llguidance's threads (the GIL is released).
    out: (len(matchers), W) int32, C-contiguous, W = every matcher's row width."""
    global _EXECUTOR
    if not matchers:
        return
    words = matchers[0].words
    if out.dtype != np.int32 or out.ndim != 2 or out.shape[0] < len(matchers) or out.shape[1] != words \
            or not out.flags.c_contiguous:
        raise ValueError(f"out must be contiguous int32 of shape (>= {len(matchers)}, {words}), got "
                         f"{out.dtype} {out.shape}")
    if any(m.words != words for m in matchers):
        raise ValueError("fill_bitmasks: the matchers have different vocab sizes")
    if len(matchers) == 1:
        matchers[0].fill_bitmask(out[0])
        return
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor()
    own = matchers[0]._own_words
    if own == words:
        _EXECUTOR.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)], out.ctypes.data,
                                          words * 4, out.shape[0])
    else:                                                  # rows wider than llguidance's: fill, then zero the tail
        for i, m in enumerate(matchers):
            m.fill_bitmask(out[i])
