"""Sampling controls end to end on the tiny CPU engine (random weights, fp32, the paged reference model):
logit_bias, presence / frequency / repetition penalties, min_tokens and stop_token_ids, alone, batched with
plain requests, and through preemption. The oracle of a penalised greedy answer is the plain reference model
teacher-forced on the engine's own tokens, with the penalties applied to each position's logits by the
reference sampler of tests/test_logits_process.py (written from the formula): so every position checks that
the right counts (this request's output so far, after a resume too) and prompt reached the sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pixtral_rt.sampling import SamplingParams
from pixtral_rt.serving.llm_engine import LLMEngine
from tests.helpers import generate_concurrently
from tests.test_logits_process import reference_row

FORCED = 1000            # a token the tiny tokenizer decodes to text, not a control token


@pytest.fixture(scope="module")
def eng():
    # a pool of 16 pages of 16 tokens: 4+ long requests at once must preempt (as tests/test_constrained_decoding)
    e = LLMEngine.load(None, device="cpu", max_batch=8, max_context=256, kv_tokens=17 * 16, page_size=16,
                       chunk_tokens=32, progress=False)
    yield e
    e.shutdown()


def _msgs(i: int):
    rng = np.random.default_rng(i)
    words = " ".join(rng.choice(["river", "stone", "light", "cloud"], 8 + 5 * i))
    return [{"role": "user", "content": words}]


def _teacher_forced(eng, msgs, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) reference-model logits predicting each of `tokens` after the prompt."""
    req = eng.encode(msgs, 1)
    seq = torch.tensor(req.tokens + tokens)
    with torch.no_grad():
        return eng.runner.model.model.forward_tokens(seq)[len(req.tokens) - 1:len(seq) - 1], req.tokens


def _check_greedy_against_reference(eng, msgs, res, p: SamplingParams) -> int:
    """Every output token is the argmax of the reference sampler's processed logits at its position (up to
    1e-4: the paged and the plain reference model round differently). Returns the positions where the
    controls changed the argmax of the raw logits (so the check saw them at work)."""
    logits, prompt = _teacher_forced(eng, msgs, res.token_ids)
    changed = 0
    for i, tok in enumerate(res.token_ids):
        row = reference_row(logits[i], p, prompt, res.token_ids[:i], i, eos=eng.eos_id)
        assert row[tok] >= row.max() - 1e-4, f"output {i}: {tok} is not the controlled argmax {int(row.argmax())}"
        changed += int(logits[i].argmax()) != tok
    return changed


def test_a_strong_logit_bias_forces_the_token(eng):
    for temperature in (0.0, 1.0):
        res = eng.generate(_msgs(1), SamplingParams(max_tokens=9, temperature=temperature, seed=4,
                                                    logit_bias={FORCED: 100.0}))
        assert res.token_ids == [FORCED] * 9 and res.finish_reason == "length"
    plain = eng.generate(_msgs(1), SamplingParams(max_tokens=9))
    assert FORCED not in plain.token_ids


@pytest.mark.parametrize("kw", [dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                                dict(repetition_penalty=1.8), dict(repetition_penalty=0.7),
                                dict(frequency_penalty=0.8, presence_penalty=0.5, repetition_penalty=1.3,
                                     logit_bias={FORCED: 6.0, 77: -3.0})],
                         ids=["frequency", "presence", "repetition", "repetition<1", "all"])
def test_penalised_greedy_tokens_follow_the_reference_sampler(eng, kw):
    msgs = _msgs(2)
    p = SamplingParams(max_tokens=24, **kw)
    res = eng.generate(msgs, p)
    assert len(res.token_ids) == 24 or res.finish_reason == "stop"
    changed = _check_greedy_against_reference(eng, msgs, res, p)
    plain = eng.generate(msgs, SamplingParams(max_tokens=24))
    if kw != dict(repetition_penalty=0.7):           # < 1 favours repeats: the tiny model repeats anyway
        assert changed > 0 and res.token_ids != plain.token_ids, "the controls changed nothing here"
    if "frequency_penalty" in kw and "logit_bias" not in kw:
        # the random model repeats a few tokens (greedy); a frequency penalty spreads the answer out
        assert len(set(res.token_ids)) > len(set(plain.token_ids))


def test_min_tokens_holds_back_eos_and_stop_ids(eng):
    eos_first = dict(logit_bias={eng.eos_id: 100.0})
    assert eng.generate(_msgs(3), SamplingParams(max_tokens=10, **eos_first)).token_ids == []
    res = eng.generate(_msgs(3), SamplingParams(max_tokens=10, min_tokens=5, **eos_first))
    assert len(res.token_ids) == 5 and res.finish_reason == "stop"       # EOS came at the first allowed step
    # a stop id biased as high: neither may end the answer before 4 tokens
    p = SamplingParams(max_tokens=10, min_tokens=4, stop_token_ids=(FORCED,),
                       logit_bias={eng.eos_id: 100.0, FORCED: 100.0})
    res = eng.generate(_msgs(3), p)
    assert len(res.token_ids) == 4 and res.finish_reason == "stop"
    assert eng.eos_id not in res.token_ids and FORCED not in res.token_ids
    _check_greedy_against_reference(eng, _msgs(3), res, p)


def test_stop_token_ids_end_the_answer_and_are_not_emitted(eng):
    plain = eng.generate(_msgs(4), SamplingParams(max_tokens=20)).token_ids
    k = next(i for i in range(2, len(plain)) if plain[i] not in plain[:i])   # a token's first appearance
    res = eng.generate(_msgs(4), SamplingParams(max_tokens=20, stop_token_ids=(plain[k], 3)))
    assert res.token_ids == plain[:k] and res.finish_reason == "stop"
    assert res.text == eng.tokenizer.decode(plain[:k])


def _concurrently(eng, reqs, overlap: bool):
    return generate_concurrently(eng, reqs, overlap)     # deliver one step late when overlap, as on a GPU


CONTROLLED = [dict(frequency_penalty=1.2), dict(repetition_penalty=1.5, presence_penalty=0.4),
              dict(logit_bias={FORCED: 4.0, 5: -50.0}, min_tokens=12),
              dict(frequency_penalty=0.6, temperature=0.9, seed=11)]


@pytest.mark.parametrize("overlap", [False, True], ids=["deliver-at-once", "deliver-one-step-late"])
def test_a_mixed_batch_keeps_every_request_as_alone(eng, overlap):
    """Controlled and plain requests at once (queue > batch, chunked prefill beside decode): the plain
    requests' greedy tokens equal their solo runs (the controls of their neighbours never reach them), and
    so do the controlled ones'."""
    reqs = []
    for i in range(6):
        kw = CONTROLLED[i // 2] if i % 2 == 0 else {}
        reqs.append((_msgs(10 + i), SamplingParams(max_tokens=10 + i, **kw)))
    alone = [eng.generate(m, p) for m, p in reqs]
    got, _ = _concurrently(eng, reqs, overlap)
    for (m, p), a, g in zip(reqs, alone, got):
        assert g.token_ids == a.token_ids and g.finish_reason == a.finish_reason, p


@pytest.mark.parametrize("overlap", [False, True], ids=["deliver-at-once", "deliver-one-step-late"])
def test_preempted_controlled_requests_resume_with_the_tokens_they_get_alone(eng, overlap):
    """Long controlled requests in a pool too small for all of them: the youngest are preempted and resumed
    by recomputation; their penalties (counts rebuilt from the delivered output), min_tokens (the sampler's
    step) and seeded draws go on as if nothing happened."""
    reqs = [(_msgs(20 + i), SamplingParams(max_tokens=48 + 4 * i, **CONTROLLED[i % len(CONTROLLED)]))
            for i in range(5)]
    alone = [eng.generate(m, p) for m, p in reqs]
    got, preempted = _concurrently(eng, reqs, overlap)
    assert preempted > 0, "the pool should have forced a preemption"
    for (m, p), a, g in zip(reqs, alone, got):
        assert g.token_ids == a.token_ids and g.finish_reason == a.finish_reason, p
    for (m, p), g in zip(reqs, got):
        if p.temperature == 0:
            _check_greedy_against_reference(eng, m, g, p)
