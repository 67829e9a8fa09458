"""Serving engine on CPU (tiny random model, fp32, reference paged model): page allocator, prefix cache,
scheduler, and the engine against the plain reference model (no paging, batch 1)."""
import random
import threading

import numpy as np
import pytest
import torch

from pixtral_rt.chat import encode_request
from pixtral_rt.errors import ContextLengthError
from pixtral_rt.sampling import SamplingParams
from pixtral_rt.serving.kv_pages import TRASH_PAGE, PagePool, page_hashes
from pixtral_rt.serving.llm_engine import LLMEngine
from pixtral_rt.serving.scheduler import QueueFullError


# ----------------------------------------------------------------------------- page allocator
def test_page_pool_no_leak_under_random_events():
    rng = random.Random(0)
    pool = PagePool(97, 16)
    held: list[list[int]] = []
    known: list[bytes] = []
    for i in range(5000):
        r = rng.random()
        if r < 0.45:
            prefix = pool.match(known[:rng.randint(0, len(known))]) if known and rng.random() < 0.5 else []
            got = pool.allocate(prefix, rng.randint(0, 12))
            if got is not None:
                assert TRASH_PAGE not in got and len(set(got)) == len(got)
                held.append(got)
                if got and rng.random() < 0.5:       # register a page as a cached prefix
                    h = bytes([i % 256, i // 256 % 256, 7])
                    pool.register(got[-1], h)
                    known.append(h)
        elif held:
            pool.release(held.pop(rng.randrange(len(held))))
        pool.check()
    for t in held:
        pool.release(t)
    pool.check()
    assert pool.used == 0 and pool.available == pool.usable


def test_scheduler_and_pool_survive_random_admit_finish_cancel():
    """Thousands of random submissions (shared prefixes, so the prefix cache is hit), cancellations and
    finishes through the real scheduler: the pool's invariants hold after every step, a sequence holds exactly
    the pages of its positions, and everything is free at the end."""
    from pixtral_rt.chat import EncodedRequest
    from pixtral_rt.serving.scheduler import Scheduler
    from pixtral_rt.serving.sequence import Sequence, Status
    rng = random.Random(1)
    pool = PagePool(120, 16)
    sch = Scheduler(pool, max_batch=6, chunk_tokens=40, max_queue=10)
    base = [rng.randrange(1000) for _ in range(200)]
    live, hits, admitted = [], 0, 0
    for step in range(3000):
        if rng.random() < 0.3:
            n = rng.randint(1, 150)
            toks = base[:n] if rng.random() < 0.5 else [rng.randrange(1000) for _ in range(n)]
            req = EncodedRequest(tokens=toks, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                                 prompt_tokens=n)
            s = Sequence(req, SamplingParams(max_tokens=rng.randint(1, 60)), lambda ev: None)
            s.plan_prefix(16)
            try:
                sch.add(s)
                live.append(s)
            except (QueueFullError, ContextLengthError):
                pass
        for s in live:
            if rng.random() < 0.02:
                s.cancelled = True
        plan = sch.schedule()
        pool.check()
        admitted += len(plan.admitted)
        hits += sum(s.num_cached > 0 for s in plan.admitted)
        assert len(sch.running) <= 6 and len(set(s.slot for s in sch.running)) == len(sch.running)
        for s in sch.running:            # pages on demand: exactly those of the positions written or to write
            assert len(s.pages) == -(-max(s.num_computed, s.prefill_len) // 16)
        for s in plan.decode:                       # the engine's delivery: a token, maybe the end
            s.output.append(rng.randrange(1000))
            if len(s.output) >= s.max_tokens or rng.random() < 0.05:
                s.finish_reason, s.status = "length", Status.FINISHED
        for c in plan.prefill:
            sch.register_prefix(c.seq)
        live = [s for s in live if s.status != Status.FINISHED]
    for s in live:
        s.cancelled = True
    sch.schedule()
    pool.check()
    assert pool.used == 0 and not sch.running and not sch.waiting and len(sch.free_slots) == 6
    assert admitted > 300 and hits > 20, (admitted, hits)       # the queue moved, the prefix cache was hit


def test_page_pool_refuses_without_side_effects_and_evicts_lru():
    pool = PagePool(5, 4)                          # 4 usable pages
    a = pool.allocate([], 2)
    pool.register(a[0], b"h0")
    pool.register(a[1], b"h1")
    pool.release(a)                                # both cached, evictable
    assert pool.match([b"h0", b"h1", b"h2"]) == a
    b = pool.allocate(pool.match([b"h0"]), 3)      # revives a[0], needs 3 fresh: 2 free + evict a[1]
    assert b is not None and b[0] == a[0] and a[1] in b[1:]
    assert pool.match([b"h0", b"h1"]) == [a[0]]    # h1 evicted
    assert pool.allocate([], 1) is None            # full: nothing changes
    pool.check()


def test_page_hashes_chain():
    keys = np.arange(40, dtype=np.int64)
    h = page_hashes(keys, 16)
    assert len(h) == 2
    k2 = keys.copy()
    k2[3] = -5
    h2 = page_hashes(k2, 16)
    assert h2[0] != h[0] and h2[1] != h[1]        # a change in page 0 changes every later hash
    k3 = keys.copy()
    k3[20] = -5
    assert page_hashes(k3, 16)[0] == h[0] and page_hashes(k3, 16)[1] != h[1]


# ----------------------------------------------------------------------------- engine
def _idle(eng, timeout=10.0):
    """Finished sequences leave at the loop's next step: wait until no page is held and nothing runs."""
    for _ in range(int(timeout / 0.02)):
        m = eng.metrics()
        if m["kv_pages_used"] == 0 and m["running"] == 0 and m["waiting"] == 0:
            return True
        threading.Event().wait(0.02)
    return False


@pytest.fixture(scope="module")
def eng():
    e = LLMEngine.load(None, device="cpu", max_batch=8, max_queue=64, kv_tokens=40 * 64 * 8, page_size=16,
                       chunk_tokens=48, progress=False)
    yield e
    e.shutdown()


def _img(rng, h, w):
    return {"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}


def _msgs(seed, n_images, text="What is shown?"):
    rng = np.random.default_rng(seed)
    sizes = [(17, 40), (33, 33), (70, 20), (16, 16)]
    imgs = [_img(rng, *sizes[i % 4]) for i in range(n_images)]
    return [{"role": "user", "content": imgs + [{"type": "text", "text": text}]}]


def _reference_greedy(eng, messages, n):
    """Plain reference model, batch 1, contiguous cache: the oracle."""
    model = eng.runner.model.model
    req = encode_request(messages, eng.tokenizer, eng.args)
    out = model.generate(req.tokens, req.images, max_new_tokens=n, eos_id=eng.eos_id)
    return [t for t in out if t != eng.eos_id]


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_greedy_equals_reference_model(eng, n_images):
    m = _msgs(n_images, n_images, "Describe " * (n_images + 1))
    res = eng.generate(m, SamplingParams(max_tokens=10))
    assert res.token_ids == _reference_greedy(eng, m, 10)
    assert res.finish_reason in ("length", "stop")


def test_concurrent_greedy_is_batch_invariant(eng):
    """16 requests of different lengths and image counts at once (queue > max_batch, chunked prefill
    interleaved with decode) give each exactly the tokens it gets alone."""
    reqs = [(_msgs(100 + i, i % 4, "word " * (1 + 3 * i)), SamplingParams(max_tokens=4 + i % 5)) for i in range(16)]
    alone = [eng.generate(m, p).token_ids for m, p in reqs]
    got = [None] * len(reqs)

    def run(i):
        got[i] = eng.generate(*reqs[i]).token_ids

    ths = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(120)
    assert got == alone
    assert _idle(eng)


def test_mixed_sampling_params_in_one_batch(eng):
    """Seeded sampling is a function of (seed, step): the same whether alone or batched with others."""
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=3),
              SamplingParams(max_tokens=6, temperature=1.2, top_k=5, seed=9),
              SamplingParams(max_tokens=7, temperature=0.7, top_p=0.5, seed=1),
              SamplingParams(max_tokens=5)]
    ms = [_msgs(200 + i, i % 2) for i in range(len(params))]
    alone = [eng.generate(m, p).token_ids for m, p in zip(ms, params)]
    got = [None] * len(params)

    def run(i):
        got[i] = eng.generate(ms[i], params[i]).token_ids

    ths = [threading.Thread(target=run, args=(i,)) for i in range(len(params))]
    [t.start() for t in ths]
    [t.join(120) for t in ths]
    assert got == alone
    assert got[0] != got[3]           # the sampled stream is not the greedy one


def test_logprobs_match_reference_logits(eng):
    m = _msgs(7, 1)
    res = eng.generate(m, SamplingParams(max_tokens=3), logprobs=5)
    assert len(res.logprobs) == len(res.token_ids) == 3
    model = eng.runner.model.model
    req = encode_request(m, eng.tokenizer, eng.args)
    with torch.no_grad():
        logits = model.forward_tokens(torch.tensor(req.tokens + res.token_ids[:-1]), req.images)
    want = torch.log_softmax(logits[req.prompt_tokens - 1:], -1).gather(1, torch.tensor(res.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(res.logprobs), want, rtol=0, atol=1e-4)


def test_prefix_cache_reuses_image_pages_and_keeps_output(eng):
    rng = np.random.default_rng(5)
    img = _img(rng, 64, 48)                        # 4x3 patches: 12 [IMG] + 4 [IMG_BREAK]/[IMG_END]
    turn1 = [{"role": "user", "content": [img, {"type": "text", "text": "what is it " * 6}]}]
    r1 = eng.generate(turn1, SamplingParams(max_tokens=6))
    turn2 = turn1 + [{"role": "assistant", "content": eng.tokenizer.decode(r1.token_ids)},
                     {"role": "user", "content": "and then?"}]
    cached_before = eng.metrics()["cached_prompt_tokens_total"]
    r2 = eng.generate(turn2, SamplingParams(max_tokens=6))
    hit = eng.metrics()["cached_prompt_tokens_total"] - cached_before
    assert hit >= 16 * ((len(encode_request(turn1, eng.tokenizer, eng.args).tokens) - 1) // 16)
    assert r2.token_ids == _reference_greedy(eng, turn2, 6)
    # another picture with the same token layout must not hit the image pages
    other = [{"role": "user", "content": [_img(rng, 64, 48), {"type": "text", "text": "what is it " * 6}]}]
    c0 = eng.metrics()["cached_prompt_tokens_total"]
    r3 = eng.generate(other, SamplingParams(max_tokens=6))
    assert eng.metrics()["cached_prompt_tokens_total"] - c0 < 16     # at most the page before the image
    assert r3.token_ids == _reference_greedy(eng, other, 6)


def test_stop_string_cancel_and_page_release(eng):
    m = _msgs(11, 1)
    full = eng.generate(m, SamplingParams(max_tokens=12))
    stop = full.text[2:5]
    res = eng.generate(m, SamplingParams(max_tokens=12, stop=(stop,)))
    assert res.finish_reason == "stop" and res.text == full.text[:full.text.find(stop)]
    pieces = []
    gen = eng.stream(m, SamplingParams(max_tokens=400))
    pieces.append(next(gen))
    gen.close()                                    # consumer goes away: the request is cancelled
    assert _idle(eng)


def test_max_tokens_one_and_refusals(eng):
    res = eng.generate(_msgs(3, 0), SamplingParams(max_tokens=1))
    assert len(res.token_ids) <= 1 and res.finish_reason in ("length", "stop")
    req = eng.encode(_msgs(3, 0), 10)
    # nothing is reserved for max_tokens: a max_tokens past the pool is accepted (its output is capped)
    evs = []
    eng.submit(req, SamplingParams(max_tokens=eng.pool.usable * 16), evs.append).cancel()
    assert _idle(eng) and evs[-1].finish_reason in ("abort", "stop")
    # a prompt that cannot fit with one generated token is refused, with the counts
    from pixtral_rt.chat import EncodedRequest
    for n, what in ((eng.pool.usable * 16, "whole cache holds 20464"), (eng.max_context, "context of 8192")):
        big = EncodedRequest(tokens=[5] * n, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                             prompt_tokens=n)
        with pytest.raises(ContextLengthError, match=f"{n} prompt tokens .* {what}"):
            eng.submit(big, SamplingParams(max_tokens=2), lambda ev: None)
    with pytest.raises(ValueError, match="top_logprobs"):
        eng.submit(req, SamplingParams(max_tokens=2), lambda ev: None, logprobs=21)


def test_queue_full_is_refused():
    e = LLMEngine.load(None, device="cpu", max_batch=1, max_queue=1, kv_tokens=4096 + 128, page_size=16,
                       progress=False)
    try:
        req = e.encode(_msgs(1, 0), 8)
        gate = threading.Event()
        evs = []

        def slow(ev):
            evs.append(ev)
            gate.wait(10)                          # hold the step loop inside the first request
        h1 = e.submit(req, SamplingParams(max_tokens=50), slow)
        for _ in range(100):
            if evs:
                break
            threading.Event().wait(0.05)
        e.submit(req, SamplingParams(max_tokens=8), lambda ev: None)          # waits (queue of 1)
        with pytest.raises(QueueFullError, match="waiting"):
            e.submit(req, SamplingParams(max_tokens=8), lambda ev: None)
        h1.cancel()
        gate.set()
    finally:
        e.shutdown()


def test_engine_process_matches_the_thread_engine_and_reports_its_death(eng):
    """EngineClient (the engine in its own process, what the server uses) gives the in-process engine's
    tokens; if the engine process dies, open requests end with an error instead of hanging."""
    import queue

    from pixtral_rt.serving.engine_client import EngineClient
    c = EngineClient.start(None, device="cpu", max_batch=4, kv_tokens=4096 + 64, page_size=16, progress=False)
    try:
        m = _msgs(21, 1)

        def run(max_tokens, kill=False):
            q = queue.SimpleQueue()
            c.submit(c.encode(m, max_tokens), SamplingParams(max_tokens=max_tokens), q.put)
            toks = []
            while True:
                ev = q.get(timeout=60)
                toks += ev.token_ids
                if kill and toks:
                    c._proc.kill()
                    kill = False
                if ev.finish_reason:
                    return toks, ev
        toks, ev = run(6)
        assert ev.finish_reason in ("length", "stop") and toks == eng.generate(m, SamplingParams(max_tokens=6)).token_ids
        _, ev = run(500, kill=True)
        assert ev.finish_reason == "error" and "engine process" in ev.error
        assert not c.ready
        with pytest.raises(RuntimeError, match="not running"):
            c.submit(c.encode(m, 4), SamplingParams(max_tokens=4), lambda ev: None)
    finally:
        c.shutdown()


def test_generated_pages_are_reused_by_the_next_turn(eng):
    """A request whose prompt continues an earlier prompt + its generated tokens reuses the pages that hold
    those generated tokens too, and still gives the reference model's tokens."""
    from pixtral_rt.chat import EncodedRequest
    m = _msgs(31, 1, "tell me " * 9)
    req1 = eng.encode(m, 40)
    out1 = eng.generate(m, SamplingParams(max_tokens=40)).token_ids
    assert len(out1) == 40
    toks = req1.tokens + out1 + [3, 1045, 1049]
    req2 = EncodedRequest(tokens=toks, images=req1.images, patch_grids=req1.patch_grids,
                          image_token_positions=req1.image_token_positions, cu_seqlens=req1.cu_seqlens,
                          prompt_tokens=len(toks), image_out_hw=req1.image_out_hw,
                          images_are_raw=req1.images_are_raw)
    assert _idle(eng)
    c0 = eng.metrics()["cached_prompt_tokens_total"]
    res2 = _run_encoded(eng, req2, 5)
    hit = eng.metrics()["cached_prompt_tokens_total"] - c0
    P = eng.pool.page_size
    assert hit == P * ((len(req1.tokens) + len(out1) - 1) // P) > P * ((len(req1.tokens) - 1) // P)
    model = eng.runner.model.model
    want = [t for t in model.generate(toks, encode_request(m, eng.tokenizer, eng.args).images, max_new_tokens=5,
                                      eos_id=eng.eos_id) if t != eng.eos_id]
    assert res2 == want


def _run_encoded(eng, req, n):
    from pixtral_rt.serving.outputs import GenerationResult
    res = GenerationResult()
    for _ in eng.stream(None, SamplingParams(max_tokens=n), req=req, result=res):
        pass
    return res.token_ids


def test_step_upload_views_are_exact_and_16_byte_aligned():
    """ModelRunner._upload: one copy for the step's index arrays; every view holds its array (int32 or int64)
    and starts 16-byte aligned (Triton compiles another kernel variant for a misaligned pointer, so a view at an
    odd offset would compile at request time what the warm-up compiled for aligned tensors)."""
    import types

    import numpy as np
    import torch

    from pixtral_rt.serving.model_runner import ModelRunner
    runner = types.SimpleNamespace(device=torch.device("cpu"))
    a32 = [np.arange(5), [7], np.arange(1000, 1003), []]
    a64 = [[3, 1, 2], np.arange(9) * 11, [2**31 - 1]]
    views = ModelRunner._upload(runner, a32, a64)
    assert len(views) == len(a32) + len(a64)
    for v, x, dt in zip(views, a32 + a64, [torch.int32] * len(a32) + [torch.int64] * len(a64)):
        assert v.dtype == dt and v.tolist() == list(np.asarray(x, dtype=np.int64))
        assert v.numel() == 0 or v.data_ptr() % 16 == 0, (x, v.data_ptr() % 16)
    with pytest.raises(OverflowError):
        ModelRunner._upload(runner, [[2**31]])


def test_engine_client_hands_a_batch_to_each_event_loop_in_order():
    """EngineClient's reader: a batch of events from the engine process reaches each event loop in one
    hand-over (LoopCallback: loop + put), in arrival order per stream; plain callbacks are still called
    directly; a closed loop loses its events without stopping the reader (the others still get theirs)."""
    import asyncio
    import threading
    from pixtral_rt.server.completion import LoopCallback
    from pixtral_rt.serving.engine_client import EngineClient
    from pixtral_rt.serving.outputs import TokenEvent

    class Conn:                                  # the engine process's pipe: two batches, then closed
        def __init__(self, msgs):
            self.msgs = list(msgs)

        def recv(self):
            if not self.msgs:
                raise EOFError
            return self.msgs.pop(0)

    loops = [asyncio.new_event_loop() for _ in range(3)]
    threads = [threading.Thread(target=lp.run_forever, daemon=True) for lp in loops]
    for t in threads:
        t.start()
    queues = [asyncio.Queue() for _ in range(2)]
    hand_overs = []
    for lp in loops[:2]:                         # count the loop's wake-ups by the reader
        orig = lp.call_soon_threadsafe
        lp.call_soon_threadsafe = (lambda *a, _o=orig, _lp=lp: (hand_overs.append(_lp), _o(*a))[1])
    loops[2].call_soon_threadsafe(loops[2].stop)
    threads[2].join(5)
    loops[2].close()                             # a server whose loop is gone
    plain = []
    c = EngineClient()
    c._callbacks = {"a": LoopCallback(loops[0], queues[0], 0), "b": LoopCallback(loops[0], queues[0], 1),
                    "c": LoopCallback(loops[1], queues[1], 0), "d": plain.append,
                    "e": LoopCallback(loops[2], asyncio.Queue(), 0)}
    ev = lambda t, fin=None: TokenEvent(token_ids=[t], finish_reason=fin)   # noqa: E731
    batch1 = [(r, ev(10 + i)) for i, r in enumerate("abcde")] + [("a", ev(20)), ("c", ev(21))]
    batch2 = [("a", ev(30, "stop")), ("b", ev(31)), ("c", ev(32)), ("d", ev(33)), ("e", ev(34))]
    c._from_engine = Conn([("events", batch1), ("events", batch2)])
    c._read()                                    # returns at EOF: the remaining streams end with an error

    def drain(lp, q):
        async def get():
            out = []
            while not q.empty():
                i, e = q.get_nowait()
                out.append((i, e.token_ids, e.finish_reason))
            return out
        return asyncio.run_coroutine_threadsafe(get(), lp).result(5)
    got0, got1 = drain(loops[0], queues[0]), drain(loops[1], queues[1])
    assert [t for i, t, _ in got0 if i == 0] == [[10], [20], [30]]
    assert [t for i, t, _ in got0 if i == 1][:2] == [[11], [31]] and got0[-1][2] == "error"   # b: engine gone
    assert [t for i, t, f in got1 if f is None] == [[12], [21], [32]]
    assert [e.token_ids for e in plain][:2] == [[13], [33]]
    # one wake-up per loop per batch, not one per event (+ the end-of-engine errors, called one by one)
    assert hand_overs[:4].count(loops[0]) == 2 and hand_overs[:4].count(loops[1]) == 2
    for lp in loops[:2]:
        lp.call_soon_threadsafe(lp.stop)
