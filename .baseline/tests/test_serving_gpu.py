"""Serving engine on the GPU: full-size random Pixtral-12B, bf16, fast paged model with decode graphs.
32 concurrent mixed greedy requests against each run alone (tests/agreement.py: every position on the shared
prefix), with a negative control (an engine whose decode reads the neighbouring slot's KV pages); the paged
fast path's logprobs against the fp32 reference (the same bf16 weights computed in fp32), bounded by a fixed
multiple of PyTorch's own bf16 error on the same input, with a negative control (the reference shown
another image)."""
import threading

import numpy as np
import pytest
import torch

from tests.agreement import check_agreement
from tests.conftest import requires_gpu
from pixtral_rt.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.fixture(scope="module")
def eng():
    from pixtral_rt.serving.llm_engine import LLMEngine
    # KV pool capped so the reference model (25 GB) fits beside the engine for the second test
    e = LLMEngine.load(None, max_batch=64, max_context=32768, kv_tokens=131072, progress=False)
    yield e
    e.shutdown()


def _msgs(i):
    rng = np.random.default_rng(i)
    kind = i % 3
    n_img = [0, 1, 4][kind]
    sizes = [(1024, 1024), (512, 768), (768, 512), (256, 256)]
    imgs = [{"type": "image", "image": rng.integers(0, 256, (*sizes[(j + i) % 4], 3), dtype=np.uint8)}
            for j in range(n_img)]
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "image", "river"], 5 + 40 * (i % 5)))
    return [{"role": "user", "content": imgs + [{"type": "text", "text": text}]}]


def _run_all(eng, msgs, params, concurrent: bool):
    out = [None] * len(msgs)

    def run(i):
        out[i] = eng.generate(msgs[i], params[i], logprobs=20)

    if not concurrent:
        for i in range(len(msgs)):
            run(i)
        return out
    ths = [threading.Thread(target=run, args=(i,)) for i in range(len(msgs))]
    [t.start() for t in ths]
    [t.join(300) for t in ths]
    assert all(o is not None for o in out), "a request did not finish in 300 s"
    return out


def test_32_concurrent_mixed_requests_match_alone(eng):
    n = 32
    params = [SamplingParams(max_tokens=16 + 8 * (i % 4)) for i in range(n)]
    msgs = [_msgs(i) for i in range(n)]
    alone = _run_all(eng, msgs, params, concurrent=False)
    got = _run_all(eng, msgs, params, concurrent=True)
    check_agreement(alone, got, "32 concurrent mixed requests, batched vs alone")


def test_agreement_check_catches_another_requests_kv():
    """The negative control of the test above: an engine whose decode reads each slot's block-table row
    from the slot before it (a batching bug: another request's KV pages) must be rejected by check_agreement.
    Pixtral-12B's real shapes, first 8 decoder layers, no CUDA graphs (so the broken decode is the one run)."""
    from pixtral_rt.serving.llm_engine import LLMEngine
    e = LLMEngine.load(None, max_batch=16, max_context=16384, kv_tokens=65536, progress=False, use_graphs=False,
                       random_weights="Pixtral-12B-2409:layers=8")
    try:
        n = 8
        params = [SamplingParams(max_tokens=12) for _ in range(n)]
        msgs = [_msgs(i) for i in range(n)]
        alone = _run_all(e, msgs, params, concurrent=False)
        model = e.runner.model
        decode = model.decode
        model.decode = lambda tokens, positions, block_table, lens: decode(tokens, positions,
                                                                           block_table.roll(1, 0), lens)
        try:
            got = _run_all(e, msgs, params, concurrent=True)
        finally:
            model.decode = decode
    finally:
        e.shutdown()
        del e
        torch.cuda.empty_cache()
    with pytest.raises(AssertionError, match="share|differ|left|off"):
        check_agreement(alone, got, "decode reading the neighbour's KV pages (must fail)")


def _fp32_errors(res, lp32) -> float:
    """max |logprob - fp32 reference| over every position of `res` and every token of its top 20."""
    return max(abs(v - lp32[j, t].item()) for j, top in enumerate(res.top_logprobs) for t, v in top)


def test_paged_fast_path_matches_fp32_reference_at_every_position(eng):
    """Prefill + 8 decode steps of one 1-image request on the engine, against the reference model with the
    same bf16 weights computed in fp32 (reference/upcast.py: no 50 GB fp32 copy), teacher-forced on the
    engine's tokens so that every position is comparable. Bound fixed in advance: at most 3x the error of
    PyTorch's own bf16 forward of the same model on the same tokens (measured here), over the top 20 tokens
    of every position. Negative control: the same bound against the reference shown another image fails."""
    from pixtral_rt.chat import encode_request
    from pixtral_rt.engine import load_reference_model, resolve_model
    from pixtral_rt.reference.upcast import fp32_compute
    m = _msgs(1)
    res = eng.generate(m, SamplingParams(max_tokens=8), logprobs=20)
    assert len(res.token_ids) == 8, "the engine stopped early (EOS): the test needs 8 positions"
    src = resolve_model(None, "cuda", "bfloat16", None)
    ref = load_reference_model(src, progress=False)
    req = encode_request(m, eng.tokenizer, eng.args)
    toks = torch.tensor(req.tokens + res.token_ids[:-1], device="cuda")
    imgs = [im.cuda().bfloat16() for im in req.images]
    other = [imgs[0].flip(-1)]                      # same size, other pixels
    t0 = req.prompt_tokens - 1
    with torch.no_grad():
        lp16 = torch.log_softmax(ref.forward_tokens(toks, imgs)[t0:].float(), -1).cpu()
        with fp32_compute(ref):
            lp32 = torch.log_softmax(ref.forward_tokens(toks, imgs)[t0:], -1).cpu()
            lp32_other = torch.log_softmax(ref.forward_tokens(toks, other)[t0:], -1).cpu()
    del ref
    torch.cuda.empty_cache()
    err_fast = _fp32_errors(res, lp32)
    err_torch = max(abs(lp16[j, t].item() - lp32[j, t].item()) for j, top in enumerate(res.top_logprobs)
                    for t, _ in top)
    err_other = _fp32_errors(res, lp32_other)
    bound = 3 * err_torch
    print(f"\nmax |logprob - fp32 reference| over 8 positions x top 20: engine {err_fast:.4f}, PyTorch bf16 "
          f"{err_torch:.4f} (bound 3x = {bound:.4f}); against the reference shown another image {err_other:.4f}")
    assert err_torch > 0, "the bf16 and fp32 references agree exactly: fp32_compute did not take effect"
    assert err_fast <= bound, f"engine {err_fast:.4f} nats off the fp32 reference, bound {bound:.4f}"
    assert err_other > bound, "negative control: a wrong image must exceed the bound"
