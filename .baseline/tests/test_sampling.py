"""Device sampling: greedy equals argmax, top-k/top-p never pick outside their set, seeds reproduce,
and the empirical distribution matches softmax(logits / T)."""
import pytest
import torch

from pixtral_rt.sampling import SamplingParams, SamplingState, sample, uniform_noise


def state(B, **kw):
    st = SamplingState(B, "cpu")
    for i in range(B):
        st.set(i, SamplingParams(**kw))
    return st


def test_greedy_is_argmax():
    logits = torch.randn(3, 1000)
    assert torch.equal(sample(logits, state(3)), logits.argmax(-1))
    assert torch.equal(sample(logits, state(3), greedy_only=True), logits.argmax(-1))


def test_noise_is_uniform_and_reproducible():
    seed, step = torch.tensor([1, 2]), torch.tensor([0, 0])
    u = uniform_noise(seed, step, 50_000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert torch.equal(u, uniform_noise(seed, step, 50_000))
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(u, uniform_noise(seed, step + 1, 50_000))


def test_distribution_matches_softmax():
    torch.manual_seed(0)
    V, B = 8, 4000
    logits = torch.randn(V).repeat(B, 1)
    st = SamplingState(B, "cpu")
    for i in range(B):
        st.set(i, SamplingParams(temperature=0.7, seed=i))
    toks = sample(logits, st)
    freq = torch.bincount(toks, minlength=V).float() / B
    want = torch.softmax(logits[0] / 0.7, -1)
    assert (freq - want).abs().max() < 0.03


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.3)])
def test_top_k_top_p_restrict_the_support(top_k, top_p):
    torch.manual_seed(1)
    V, B = 64, 512
    logits = torch.randn(V).repeat(B, 1)
    st = SamplingState(B, "cpu")
    for i in range(B):
        st.set(i, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=100 + i))
    toks = sample(logits, st)
    order = logits[0].argsort(descending=True)
    p = torch.softmax(logits[0], -1)[order]
    n = V if top_k == 0 else top_k
    n = min(n, int(((p.cumsum(0) - p) < top_p).sum()))
    allowed = set(order[:n].tolist())
    assert set(toks.tolist()) <= allowed
    assert len(set(toks.tolist())) == len(allowed)  # and every allowed token shows up


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.randn(2, 5000)
    a = sample(logits, state(2, temperature=1.0, seed=7))
    b = sample(logits, state(2, temperature=1.0, seed=7))
    c = sample(logits, state(2, temperature=1.0, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw,msg", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens")])
def test_bad_params_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)
