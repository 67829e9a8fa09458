"""serving/api.py: LLMEngine and EngineClient implement the ServingEngine Protocol (every Protocol method
with the same parameters: names, kinds, defaults; an implementation may only add optional ones; every
attribute present), and the admission checks refuse a bad request identically through both."""
import dataclasses
import inspect

import pytest

from pixtral_rt.sampling import SamplingParams
from pixtral_rt.serving.api import MAX_TOP_LOGPROBS, ServingEngine, check_admission
from pixtral_rt.serving.engine_client import EngineClient
from pixtral_rt.serving.llm_engine import LLMEngine


def _methods(proto) -> list[str]:
    return [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]


def signature_mismatches(proto, impl) -> list[str]:
    """What keeps `impl` from matching `proto` method by method (empty: it matches)."""
    bad = []
    for name in _methods(proto):
        fn = getattr(impl, name, None)
        if fn is None:
            bad.append(f"{impl.__name__}.{name} is missing")
            continue
        want = list(inspect.signature(getattr(proto, name)).parameters.values())
        got = list(inspect.signature(fn).parameters.values())
        for w, g in zip(want, got):
            if (w.name, w.kind, w.default) != (g.name, g.kind, g.default):
                bad.append(f"{impl.__name__}.{name}: parameter {g} where the Protocol has {w}")
        if len(got) < len(want):
            bad.append(f"{impl.__name__}.{name}: {len(got)} parameters, the Protocol has {len(want)}")
        for g in got[len(want):]:
            if g.default is inspect.Parameter.empty and g.kind not in (g.VAR_POSITIONAL, g.VAR_KEYWORD):
                bad.append(f"{impl.__name__}.{name}: extra required parameter {g.name}")
    return bad


@pytest.mark.parametrize("impl", [LLMEngine, EngineClient])
def test_both_implement_the_protocol(impl):
    assert _methods(ServingEngine) == ["encode", "submit", "metrics", "shutdown"]
    assert signature_mismatches(ServingEngine, impl) == []


def test_the_signature_check_can_fail():
    """Negative control: an implementation with a renamed parameter, a missing method or an extra required
    parameter is reported."""
    class Renamed:
        def encode(self, messages, max_new_tokens, image_limits=None): ...
        def submit(self, req, params, on_output, logprobs=None, request_id=""): ...
        def metrics(self, verbose): ...
    bad = signature_mismatches(ServingEngine, Renamed)
    assert any("encode" in b and "max_new_tokens" in b for b in bad)
    assert any("shutdown is missing" in b for b in bad)
    assert any("metrics: extra required parameter verbose" in b for b in bad)


@pytest.fixture(scope="module")
def engines():
    kw = dict(device="cpu", max_batch=2, max_context=512, kv_tokens=1024, progress=False)
    one = LLMEngine.load(None, **kw)
    two = EngineClient.start(None, **kw)
    yield one, two
    two.shutdown()
    one.shutdown()


def _refusal(eng, req, params, logprobs):
    with pytest.raises(Exception) as info:
        eng.submit(req, params, lambda ev: None, logprobs)
    return type(info.value), str(info.value)


def test_admission_is_the_same_through_both(engines):
    one, two = engines
    for eng in engines:
        assert isinstance(eng, ServingEngine)        # attributes and methods present (runtime check)
    msgs = [{"role": "user", "content": "Hello"}]
    req = one.encode(msgs, 4)
    p = SamplingParams(max_tokens=4)
    for bad in (MAX_TOP_LOGPROBS + 1, -1):
        a, b = _refusal(one, req, p, bad), _refusal(two, req, p, bad)
        assert a == b == (ValueError, f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {bad}")
    # pages come on demand: a large max_tokens reserves nothing and is accepted; a prompt over the whole
    # 960-token cache (an encoded request built past the context check, as a long-context model's would be)
    # is refused by both with the counts
    for eng in engines:
        eng.submit(req, SamplingParams(max_tokens=5000), lambda ev: None, None).cancel()
    n = 1200
    huge = dataclasses.replace(req, tokens=(req.tokens * n)[:n], prompt_tokens=n)
    a, b = _refusal(one, huge, p, None), _refusal(two, huge, p, None)
    assert a == b and a[0].__name__ == "ContextLengthError" and "whole cache holds 960 tokens" in a[1], a
    # and a good request is accepted by both
    for eng in engines:
        h = eng.submit(req, p, lambda ev: None, MAX_TOP_LOGPROBS)
        h.cancel()


def test_check_admission_alone():
    class Req:
        prompt_tokens = 10
    check_admission(Req, SamplingParams(max_tokens=500), 0, 11, 1)   # prompt + 1 token fit one page of 11
    with pytest.raises(Exception, match="whole cache holds 10 tokens"):
        check_admission(Req, SamplingParams(max_tokens=1), None, 10, 1)
