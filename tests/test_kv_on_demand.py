"""KV pages on demand with preemption (issue 20), on the host: the real Scheduler + PagePool driven for
thousands of steps by a fake model runner, with a pool far smaller than the sum of what the requests want.

The fake runner keeps the device's per-slot state (the position each slot feeds next) and the contents of
every KV page (the token written at each row), and "samples" output token i of a sequence as a pure function
of (sequence, i), so a lost, duplicated or shifted token, a resume that feeds other tokens than the delivered
ones, a position written outside the sequence's pages, or a prefix-cache hit on a page holding other tokens
all fail an assertion. Delivery follows LLMEngine._deliver, either at once (CPU) or one step late (GPU:
the next step is launched before the previous one's tokens are read), including the discard of reports of
sequences preempted in between.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from pixtral_rt.chat import EncodedRequest
from pixtral_rt.sampling import SamplingParams
from pixtral_rt.serving.kv_pages import PagePool
from pixtral_rt.serving.scheduler import Scheduler, fair_shares
from pixtral_rt.serving.sequence import Sequence, Status
from tests.helpers import generate_concurrently

P = 16
EOS = 0
NO_LIMIT = 1 << 30            # "no max_tokens": the sequence's token_cap (context / pool) decides


def _tok(seq: Sequence, i: int) -> int:
    """Output token i of `seq` (never EOS: EOS comes at seq.eos_at)."""
    return 1 + (seq.id * 7919 + i * 104729) % 999


class FakeRunner:
    """The model runner's effect, on the host: per-slot feed position, page contents, reports."""

    def __init__(self, pool: PagePool, max_batch: int):
        self.owner: list[Sequence | None] = [None] * max_batch
        self.pos = [0] * max_batch                      # position of the token the slot feeds next
        self.kv = np.full((pool.n_pages, P), -1, dtype=np.int64)   # token written at each row

    def _write(self, seq: Sequence, p: int, token: int) -> None:
        assert p < len(seq.pages) * P, f"{seq.request_id} writes position {p} past its {len(seq.pages)} pages"
        self.kv[seq.pages[p // P], p % P] = token

    def run(self, plan) -> list[tuple[Sequence, int]]:
        for s in plan.released + plan.preempted:
            if s.slot >= 0:
                self.owner[s.slot] = None
        for s in plan.admitted:
            assert self.owner[s.slot] is None, "a slot given to two sequences"
            self.owner[s.slot] = s
            # pages taken from the prefix cache must hold exactly this sequence's tokens
            n = s.registered * P                     # (num_computed already counts this step's chunk)
            want = np.asarray(s.prefill_tokens(0, n), dtype=np.int64)
            got = np.concatenate([self.kv[pg] for pg in s.pages[:n // P]]) if n else want[:0]
            assert np.array_equal(got, want), f"{s.request_id}: a prefix-cache hit on pages of other tokens"
        reports = []
        for s in plan.decode:
            assert self.owner[s.slot] is s
            p = self.pos[s.slot]
            assert p == s.num_computed - 1, (p, s.num_computed)
            i = p - s.prompt_len                     # the token fed here is output token i (sampled before)
            self._write(s, p, EOS if i == s.eos_at else _tok(s, i))
            reports.append((s, i + 1))
            self.pos[s.slot] = p + 1
        for c in plan.prefill:
            s = c.seq
            assert self.owner[s.slot] is s
            toks = s.prefill_tokens(c.start, c.end)
            # the resume feeds prompt + exactly the delivered output
            want = list(s.req.tokens) + [_tok(s, i) for i in range(len(s.output))]
            assert toks == want[c.start:c.end], f"{s.request_id}: prefill feeds other tokens"
            for p, t in zip(range(c.start, c.end), toks):
                self._write(s, p, t)
            if c.last:
                self.pos[s.slot] = s.prefill_len
                reports.append((s, s.prefill_len - s.prompt_len))   # also its sampling step
        return reports


def deliver(reports, finished: list) -> int:
    """LLMEngine._deliver on fake tokens -> how many reports of preempted sequences it dropped."""
    dropped = 0
    for s, i in reports:
        if s.finish_reason is not None or s.cancelled:
            continue
        if s.status == Status.WAITING:         # preempted after this step was planned: the resume recomputes it
            dropped += 1
            continue
        assert i == len(s.output), f"{s.request_id}: token {i} delivered after {len(s.output)} (gap or duplicate)"
        if i == s.eos_at:
            s.finish_reason = "stop"
        else:
            s.output.append(_tok(s, i))
            if len(s.output) >= s.max_tokens:
                s.finish_reason = "length"
        if s.finish_reason is not None:
            s.status = Status.FINISHED
            finished.append(s)
    return dropped


def check_pages(pool: PagePool, sch: Scheduler) -> None:
    pool.check()
    held: dict[int, int] = {}
    for s in sch.running:
        assert len(set(s.pages)) == len(s.pages)
        for pg in s.pages:
            held[pg] = held.get(pg, 0) + 1
    for s in sch.waiting:
        assert not s.pages, "a waiting sequence holds pages"
        assert s.status == Status.WAITING and s.finish_reason is None, "a finished sequence waits to be admitted"
    for pg in range(1, pool.n_pages):          # refcounts exact: the number of block tables holding the page
        assert pool.ref[pg] == held.get(pg, 0), (pg, pool.ref[pg], held.get(pg, 0))
        if held.get(pg, 0) > 1:
            assert pg in pool.hash_of, f"page {pg} shared by {held[pg]} sequences but not a cached prefix page"
    assert len({s.slot for s in sch.running}) == len(sch.running)


def fuzz(seed: int, overlap: bool, n_requests: int = 300, n_pages: int = 41, max_batch: int = 8,
         max_context: int = 1024, prefill_schedule: str = "fifo") -> dict:
    rng = random.Random(seed)
    pool = PagePool(n_pages, P)                # 40 usable pages = 640 tokens
    sch = Scheduler(pool, max_batch, chunk_tokens=48, max_queue=1000, max_context=max_context,
                    prefill_schedule=prefill_schedule)
    runner = FakeRunner(pool, max_batch)
    base = [rng.randrange(1, 1000) for _ in range(300)]       # shared prefixes: prefix-cache hits
    seqs, finished, prev = [], [], []
    steps = dropped = multi = 0
    while len(seqs) < n_requests or any(s.finish_reason is None and not s.cancelled for s in seqs) \
            or sch.running or sch.waiting or prev:
        steps += 1
        assert steps < 200_000, "requests do not finish"
        if len(seqs) < n_requests and rng.random() < 0.15:
            n = rng.randint(1, 300)
            toks = base[:n] if rng.random() < 0.5 else [rng.randrange(1, 1000) for _ in range(n)]
            req = EncodedRequest(tokens=toks, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                                 prompt_tokens=n)
            mt = NO_LIMIT if rng.random() < 0.5 else rng.randint(1, 700)
            s = Sequence(req, SamplingParams(max_tokens=mt), lambda ev: None)
            s.eos_at = rng.randint(0, 600) if rng.random() < 0.6 else -1
            s.disconnect_at = rng.randint(1, 300) if rng.random() < 0.15 else -1
            s.plan_prefix(P)
            sch.add(s)
            seqs.append(s)
        for s in seqs:
            if s.finish_reason is None and not s.cancelled and (
                    rng.random() < 0.00003 or 0 <= s.disconnect_at <= len(s.output)):
                s.cancelled = True                 # a cancel, or a client that leaves after some tokens
        plan = sch.schedule()
        check_pages(pool, sch)
        assert sum(c.end - c.start for c in plan.prefill) <= (sch.chunk_tokens if plan.decode else
                                                              sch.solo_chunk_tokens), "over the prefill budget"
        multi = multi + (len(plan.prefill) > 1 and bool(plan.decode))
        reports = runner.run(plan)
        for c in plan.prefill:
            sch.register_prefix(c.seq)
        if overlap:
            dropped += deliver(prev, finished)
            prev = reports
        else:
            deliver(reports, finished)
    check_pages(pool, sch)
    assert pool.used == 0 and pool.available == pool.usable, "pages leaked"
    assert len(sch.free_slots) == max_batch
    for s in seqs:
        assert s.status == Status.FINISHED
        assert s.output == [_tok(s, i) for i in range(len(s.output))]
        if s.cancelled:
            continue
        if s.finish_reason == "stop":
            assert len(s.output) == s.eos_at
        else:
            assert s.finish_reason == "length" and len(s.output) == s.max_tokens
            assert s.max_tokens == min(s.params.max_tokens, 640 - s.prompt_len + 1, max_context - s.prompt_len)
    return {"steps": steps, "dropped": dropped, "shared_steps": multi, "preemptions": sch.preemptions, "resumed": sum(s.preemptions > 0 for s in seqs),
            "finished": len(finished), "capped": sum(s.finish_reason == "length" and s.params.max_tokens == NO_LIMIT
                                                     for s in seqs)}


@pytest.mark.parametrize("schedule", ["fifo", "fair"])
@pytest.mark.parametrize("overlap", [False, True], ids=["deliver-at-once", "deliver-one-step-late"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_pages_on_demand_with_preemption(seed, overlap, schedule):
    st = fuzz(seed, overlap, prefill_schedule=schedule)
    if schedule == "fair":                          # steps that shared the budget among several prompts
        assert st["shared_steps"] > 100, st
    # the pool was too small: sequences were preempted and resumed, and some ran until the pool's cap
    assert st["preemptions"] > 100 and st["resumed"] > 50 and st["capped"] > 10, st
    assert st["finished"] > 100 and st["steps"] > 20000, st
    assert (st["dropped"] > 0) == overlap, st       # in-flight tokens of preempted sequences were dropped


def test_fuzz_detects_a_resume_that_drops_a_token(monkeypatch):
    """Negative control: a resume prefill that feeds the delivered output minus its last token is caught."""
    orig = Sequence.prefill_tokens

    def dropping(self, start, end):
        toks = orig(self, start, end)
        last = self.prompt_len + len(self.output) - 1       # position of the last delivered token
        if self.preemptions and len(self.output) >= 2 and start <= last < end:
            toks[last - start] = self.output[-2]            # dropped, its predecessor fed twice
        return toks
    monkeypatch.setattr(Sequence, "prefill_tokens", dropping)
    with pytest.raises(AssertionError, match="prefill feeds other tokens|prefix-cache hit"):
        fuzz(0, True, n_requests=100)


def _plain_fair(budget: int, needs: list[int]) -> list[int]:
    """Token-by-token round robin, oldest first: the fair split with quantum 1, by its definition."""
    out = [0] * len(needs)
    while budget > 0 and any(o < n for o, n in zip(out, needs)):
        for i, n in enumerate(needs):
            if out[i] < n and budget > 0:
                out[i] += 1
                budget -= 1
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fair_shares(seed):
    rng = random.Random(seed)
    needs = [rng.choice([0, 1, 5, 16, 17, 40, 300, 1000]) for _ in range(rng.randint(1, 9))]
    budget = rng.choice([0, 1, 7, 16, 48, 100, 512])
    assert fair_shares(budget, needs) == _plain_fair(budget, needs), (budget, needs)
    for q in (16, 64):
        got = fair_shares(budget, needs, quantum=q)
        assert sum(got) == min(budget, sum(needs)), (budget, needs, got)      # nothing held back
        assert all(0 <= g <= n for g, n in zip(got, needs))
        if budget >= q * sum(n > 0 for n in needs):                          # a quantum each at least
            assert all(g >= min(n, q) for g, n in zip(got, needs)), (budget, needs, got)
        want = _plain_fair(budget, needs)             # within one quantum of the exact round robin
        assert all(abs(g - w) <= q for g, w in zip(got, want)), (budget, needs, got, want)


def _submit(sch: Scheduler, n: int, img=()) -> Sequence:
    """A prompt of n tokens (the same token n + 3 throughout: prompts of other lengths share no prefix page),
    [IMG] at positions `img`, no max_tokens, queued in `sch`."""
    req = EncodedRequest(tokens=[3 + n] * n, images=[], patch_grids=[], image_token_positions=list(img),
                         cu_seqlens=[0], prompt_tokens=n)
    s = Sequence(req, SamplingParams(max_tokens=NO_LIMIT), lambda ev: None)
    s.plan_prefix(P)
    sch.add(s)
    return s


@pytest.mark.parametrize("schedule", ["fifo", "fair"])
def test_a_short_prompt_behind_a_long_one(schedule):
    """While a sequence decodes, a long prompt (1000 tokens) is admitted, then a short one (40): "fifo" computes
    the long one first (48 a step); "fair" starts the short one in the step after its admission and
    finishes it within three steps (shares of 16: 16 + 16 + 8), while the long one keeps its share."""
    pool = PagePool(201, P)
    sch = Scheduler(pool, 4, chunk_tokens=48, max_context=4096, prefill_schedule=schedule)

    def seq(n):
        return _submit(sch, n)
    d = seq(10)
    sch.schedule()                                    # d's prefill (solo budget): d decodes from now on
    long_ = seq(1000)
    plan = sch.schedule()
    assert [c.seq for c in plan.prefill] == [long_] and plan.decode == [d]
    short = seq(40)
    steps = 0
    while short.status == Status.PREFILL or steps == 0:
        plan = sch.schedule()
        steps += 1
        assert plan.decode and d in plan.decode
        assert sum(c.end - c.start for c in plan.prefill) <= 48
        if schedule == "fifo":
            assert [c.seq for c in plan.prefill] == [long_]
            if steps > 3:
                break
        else:
            assert {c.seq for c in plan.prefill} == {long_, short}
    if schedule == "fair":
        assert steps <= 3 and short.status == Status.DECODE and long_.status == Status.PREFILL
    else:
        assert short.status == Status.PREFILL and short.num_computed == 0


def test_fair_starts_one_vision_encoding_a_step():
    """"fair": of three image prompts admitted together while a sequence decodes, one a step starts (its chunk
    reaches its images: the encoder runs); text prompts and image prompts past their images are not held."""
    pool = PagePool(201, P)
    sch = Scheduler(pool, 6, chunk_tokens=256, max_context=4096, prefill_schedule="fair")

    def seq(n, img=()):
        return _submit(sch, n, img)
    d = seq(10)
    sch.schedule()
    imgs = [seq(100, range(5, 40)) for _ in range(3)]
    text = seq(60)
    started = []
    for _ in range(3):
        plan = sch.schedule()
        assert plan.decode
        new = [c.seq for c in plan.prefill if c.seq in imgs and c.start == 0]
        assert len(new) == 1, [(c.seq.request_id, c.start, c.end) for c in plan.prefill]
        started += new
        assert text in [c.seq for c in plan.prefill] or text.status == Status.DECODE
        for s in new:                    # what the runner does: features exist until the prompt is computed
            s.features = object()
    assert started == imgs               # oldest first
    assert d.status == Status.DECODE


def test_bad_prefill_schedule_is_named():
    with pytest.raises(ValueError, match="prefill_schedule must be one of"):
        Scheduler(PagePool(11, P), 2, prefill_schedule="lifo")


def test_admission_takes_the_prompt_pages_and_a_watermark():
    pool = PagePool(101, P)                    # 100 usable pages: watermark 1
    sch = Scheduler(pool, 4, max_context=4096)
    assert sch.watermark == 1 and Scheduler(PagePool(1001, P), 4).watermark == 10

    def seq(n, mt=NO_LIMIT):
        req = EncodedRequest(tokens=[7] * n, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                             prompt_tokens=n)
        s = Sequence(req, SamplingParams(max_tokens=mt), lambda ev: None)
        s.plan_prefix(P)
        sch.add(s)
        return s
    a = seq(50 * P - 3)                        # 50 pages, no max_tokens: nothing reserved for the answer
    sch.schedule()
    assert len(a.pages) == 50
    b = seq(50 * P - 3)                        # 50 more would leave 0 < watermark: waits
    sch.schedule()
    assert b.status == Status.WAITING and len(pool.free) == 50
    assert a.max_tokens == 100 * P - (50 * P - 3) + 1       # capped by the whole pool, not the context (4096)


# ----------------------------------------------------------------------------- the engine (tiny model, CPU)
@pytest.fixture(scope="module")
def small():
    """Tiny fp32 reference model with a pool of 16 pages of 16 tokens (the smallest load allows for a
    256-token context): 8 requests of ~100 tokens each cannot all hold their pages at once."""
    from pixtral_rt.serving.llm_engine import LLMEngine
    e = LLMEngine.load(None, device="cpu", max_batch=8, max_context=256, kv_tokens=17 * 16, page_size=16,
                       chunk_tokens=32, progress=False)
    yield e
    e.shutdown()


def _requests():
    """8 requests: text of 10-60 tokens, three with small images; greedy but for two seeded sampled ones."""
    rng = np.random.default_rng(4)
    out = []
    for i in range(8):
        content = [{"type": "text", "text": " ".join(rng.choice(["river", "stone", "light", "cloud"], 8 + 6 * i))}]
        if i % 3 == 1:
            h, w = [(17, 40), (33, 33), (40, 24)][i // 3]
            content.insert(0, {"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)})
        params = SamplingParams(max_tokens=int(rng.integers(40, 90)), temperature=0.9 if i in (2, 5) else 0.0,
                                seed=11 + i)
        out.append(([{"role": "user", "content": content}], params))
    return out


def _concurrent(eng, reqs):
    return generate_concurrently(eng, reqs)[0]


def _wait_idle(eng, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = eng.metrics()
        if m["running"] == 0 and m["waiting"] == 0 and m["kv_pages_used"] == 0:
            return m
        time.sleep(0.02)
    raise AssertionError(f"pages not back: {eng.metrics()}")


@pytest.fixture(scope="module")
def alone(small):
    """Each request alone (one sequence never needs preempting: the pool holds its whole context)."""
    reqs = _requests()
    p0 = small.metrics()["preemptions_total"]
    out = [small.generate(m, p) for m, p in reqs]
    assert small.metrics()["preemptions_total"] == p0
    return reqs, out


@pytest.mark.parametrize("overlap,schedule", [(False, "fifo"), (True, "fifo"), (True, "fair")],
                         ids=["deliver-at-once", "deliver-one-step-late", "deliver-one-step-late-fair"])
def test_preempted_requests_equal_each_request_alone(small, alone, overlap, schedule):
    """All at once in a pool far too small: requests are preempted and resumed, and each one's tokens
    (greedy, and seeded sampled: the sampling step continues from the delivered count) are those it gets
    alone, with the same finish_reason. deliver-one-step-late runs the GPU's order of work on CPU (the
    previous step's tokens read after the next step was launched), so a preempted sequence has a token in
    flight that must be dropped and recomputed. "fair": the prefill budget shared among the prompts (several
    chunks of different prompts in a step, image prompts among them)."""
    reqs, want = alone
    small._overlap, small.scheduler.prefill_schedule = overlap, schedule
    try:
        p0 = small.metrics()["preemptions_total"]
        got = _concurrent(small, reqs)
        preempted = small.metrics()["preemptions_total"] - p0
    finally:
        small._overlap, small.scheduler.prefill_schedule = False, "fifo"
    assert preempted > 0, "the pool was not small enough to preempt"
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert sum(len(w.token_ids) for w in want) > 300            # the requests did run long
    m = _wait_idle(small)
    assert m["kv_pages_cached"] + m["kv_pages_free"] == m["kv_pages_total"]


def test_a_resume_that_drops_a_token_is_detected(small, alone, monkeypatch):
    """Negative control of the comparison above: a resume prefill that feeds the delivered output with its
    last token dropped (its predecessor fed twice) gives other tokens than the request alone."""
    reqs, want = alone
    orig = Sequence.prefill_tokens

    def dropping(self, start, end):
        toks = orig(self, start, end)
        last = self.prompt_len + len(self.output) - 1
        if self.preemptions and len(self.output) >= 2 and start <= last < end:
            toks[last - start] = self.output[-2]
        return toks
    monkeypatch.setattr(Sequence, "prefill_tokens", dropping)
    small.pool.forget_cached()                 # the resume computes its tokens instead of hitting cached pages
    p0 = small.metrics()["preemptions_total"]
    got = _concurrent(small, reqs)
    assert small.metrics()["preemptions_total"] > p0
    assert [g.token_ids for g in got] != [w.token_ids for w in want]
    _wait_idle(small)
