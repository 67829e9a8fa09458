"""Constrained decoding in the engine (structured output, tool calls), independent of the grammar library
(the mask kernel's own test: tests/test_token_bitmask.py): the engine's hook (mask filled before each step that
samples for a constrained sequence, grammar advanced on each delivered token, "stop" when it is complete)
driven by a fake matcher whose allowed set changes at every step, on the tiny CPU engine.

The fake matcher allows 3 tokens at output step i, a pure function of (key, i), and is complete after
`n` tokens. So: every output token must be in its step's set; a greedy constrained token must be the
reference model's argmax over that set (teacher-forced on the engine's own output), which only holds if the
mask of step i reached exactly step i; free requests beside constrained ones keep their solo tokens; and a
preempted constrained request resumes with its grammar where its delivered tokens left it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixtral_rt.sampling import SamplingParams
from pixtral_rt.serving.llm_engine import LLMEngine
from tests.helpers import generate_concurrently


def _pack(allowed: np.ndarray) -> np.ndarray:
    """(B, V) bool -> (B, ceil(V/32)) int32, bit v & 31 of word v >> 5 (llguidance's layout)."""
    B, V = allowed.shape
    W = (V + 31) // 32
    pad = np.zeros((B, W * 32), dtype=bool)
    pad[:, :V] = allowed
    bits = pad.reshape(B, W, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return bits.sum(-1).astype(np.uint32).view(np.int32)


# ----------------------------------------------------------------------------- the engine hook
class FakeMatcher:
    """Allows 3 tokens at output step i (a function of key and i); complete after n tokens."""

    def __init__(self, key: int, n: int, vocab: int, eos: int):
        self.key, self.n, self.vocab, self.eos, self.i = key, n, vocab, eos, 0

    def allowed(self, i: int) -> list[int]:
        r = np.random.default_rng(self.key * 1000 + i)
        return sorted(int(t) for t in r.choice(np.arange(100, 1000), 3, replace=False))

    def fill_bitmask(self, row: np.ndarray) -> None:
        ok = np.zeros(row.shape[0] * 32, dtype=bool)
        ok[self.allowed(self.i)] = True
        row[:] = _pack(ok[None, :])[0]

    def accept(self, tok: int) -> None:
        if tok not in self.allowed(self.i):
            raise ValueError(f"token {tok} not allowed at step {self.i}")
        self.i += 1

    def is_stopped(self) -> bool:
        return self.i >= self.n


class FakeConstraint:
    def __init__(self, key: int, n: int):
        self.key, self.n = key, n


@pytest.fixture(scope="module")
def eng():
    e = LLMEngine.load(None, device="cpu", max_batch=8, max_context=256, kv_tokens=17 * 16, page_size=16,
                       chunk_tokens=32, progress=False)
    e._matcher = lambda c: FakeMatcher(c.key, c.n, e.args.text.vocab_size, e.eos_id)
    yield e
    e.shutdown()


def _msgs(i: int):
    rng = np.random.default_rng(i)
    words = " ".join(rng.choice(["river", "stone", "light", "cloud"], 10 + 7 * i))
    return [{"role": "user", "content": words}]


def _check_constrained(eng, msgs, res, c: FakeConstraint, max_tokens: int):
    m = FakeMatcher(c.key, c.n, 0, 0)
    assert len(res.token_ids) == min(c.n, max_tokens)
    assert res.finish_reason == ("stop" if c.n <= max_tokens else "length")
    for i, t in enumerate(res.token_ids):
        assert t in m.allowed(i), f"output token {i} = {t} outside its step's set {m.allowed(i)}"


def _argmax_in_set(eng, msgs, res, c: FakeConstraint):
    """Teacher-forced reference logits at each output position, argmax over that step's allowed set."""
    req = eng.encode(msgs, 8)
    model = eng.runner.model.model
    seq = torch.tensor(req.tokens + res.token_ids)
    with torch.no_grad():
        logits = model.forward_tokens(seq)[len(req.tokens) - 1:len(seq) - 1]
    m = FakeMatcher(c.key, c.n, 0, 0)
    return [m.allowed(i)[int(logits[i, m.allowed(i)].argmax())] for i in range(len(res.token_ids))]


def test_greedy_constrained_token_is_the_reference_argmax_over_the_allowed_set(eng):
    for i, (n, max_tokens) in enumerate([(6, 16), (9, 5), (1, 4)]):
        c = FakeConstraint(key=i, n=n)
        msgs = _msgs(i)
        res = eng.generate(msgs, SamplingParams(max_tokens=max_tokens, constraint=c))
        _check_constrained(eng, msgs, res, c, max_tokens)
        assert res.token_ids == _argmax_in_set(eng, msgs, res, c)


def test_sampled_constrained_tokens_stay_in_the_allowed_set(eng):
    c = FakeConstraint(key=7, n=12)
    res = eng.generate(_msgs(3), SamplingParams(max_tokens=20, temperature=1.5, seed=3, constraint=c))
    _check_constrained(eng, _msgs(3), res, c, 20)


@pytest.mark.parametrize("overlap", [False, True], ids=["deliver-at-once", "deliver-one-step-late"])
def test_mixed_batch_with_preemption_keeps_every_request_as_alone(eng, overlap):
    """4 constrained + 4 free greedy requests at once in a pool too small for all (preemption happens):
    each gets its solo tokens; the free ones are untouched by the masks of their neighbours."""
    reqs = []
    for i in range(8):
        c = FakeConstraint(key=20 + i, n=30 + 5 * i) if i % 2 == 0 else None
        reqs.append((_msgs(i), SamplingParams(max_tokens=40 + 5 * i, constraint=c)))
    alone = [eng.generate(m, p) for m, p in reqs]
    got, preempted = generate_concurrently(eng, reqs, overlap)
    assert preempted > 0, "the pool should have forced a preemption"
    for (m, p), a, g in zip(reqs, alone, got):
        assert g.token_ids == a.token_ids and g.finish_reason == a.finish_reason
        if p.constraint is not None:
            _check_constrained(eng, m, g, p.constraint, p.max_tokens)
