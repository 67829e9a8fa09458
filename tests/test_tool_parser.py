"""The [TOOL_CALLS] parser (pixtral_rt/structured/tool_calls.py) on real token ids of tekken v3 and
SentencePiece v7m1: one call, parallel calls, text before a call (v7), calls whose head is not in the
grammar's order, stop strings on the text part; streamed one token at a time, the deltas concatenate to the
whole answer's calls (first delta: id + name with arguments "", then fragments); malformed or cut output is
text content, never an exception."""
from __future__ import annotations

import json
import re

import pytest

from pixtral_rt.chat import load_tokenizer
from pixtral_rt.config import PIXTRAL_12B, PIXTRAL_LARGE
from pixtral_rt.structured.tool_calls import ToolCallStream, new_call_id


@pytest.fixture(scope="module", params=["v3-tekken", "v7-sentencepiece"])
def tok(request):
    if request.param == "v3-tekken":
        return load_tokenizer(None, PIXTRAL_12B)
    pytest.importorskip("sentencepiece", reason="Pixtral-Large's v7m1 tokenizer needs sentencepiece")
    return load_tokenizer(None, PIXTRAL_LARGE)


def _ids(tok, text: str, calls: str | None = None) -> list[int]:
    """Token ids of an answer: `text`, then (if given) [TOOL_CALLS] and `calls`, as the model would write them
    (the encoding mistral_common gives an assistant turn: SentencePiece starts each piece with its space)."""
    enc = tok.instruct_tokenizer.tokenizer.encode
    out = enc(text, bos=False, eos=False) if text else []
    if calls is not None:
        out += [tok.instruct_tokenizer.TOOL_CALLS] + enc(calls, bos=False, eos=False)
    return out


def _run(tok, ids, stop=(), step=1):
    """(streamed content, streamed calls as [(id, name, arguments)], first deltas, the parser)."""
    p = ToolCallStream(tok, stop=stop)
    text, calls, firsts = "", {}, []
    for i in range(0, len(ids), step):
        t, deltas = p.add(ids[i:i + step])
        text += t
        for d in deltas:
            if d.id is not None:
                assert d.index not in calls and d.name and d.arguments == "", "a call's first delta: id and name"
                calls[d.index] = [d.id, d.name, ""]
                firsts.append(d)
            else:
                assert d.name is None and d.index in calls, "later deltas carry argument fragments only"
                calls[d.index][2] += d.arguments
        if p.stopped:
            break
    t, deltas = p.finish()
    text += t
    for d in deltas:
        if d.id is not None:
            calls[d.index] = [d.id, d.name, ""]
        calls[d.index][2] += d.arguments
    return text, [tuple(calls[k]) for k in sorted(calls)], firsts, p


def _whole(tok, ids, stop=()):
    p = ToolCallStream(tok, stop=stop)
    p.add(ids)
    p.finish()
    return p


CALLS = {
    "one": '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
    "nested": '[{"name": "f", "arguments": {"a": {"b": [1, {"c": "}]\\""}]}, "d": null}}]',
    "parallel": '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": "x y"}}, '
                '{"name": "a", "arguments": {"n": -1.5}}]',
    "unicode": '[{"name": "translate", "arguments": {"text": "d\u00e9j\u00e0 vu \u2013 \u65e5\u672c"}}]',
}


@pytest.mark.parametrize("case", sorted(CALLS))
@pytest.mark.parametrize("step", [1, 3, 1000], ids=["token-by-token", "3-at-once", "whole"])
def test_calls_stream_and_parse_to_the_same_calls(tok, case, step):
    ids = _ids(tok, "", CALLS[case])
    text, streamed, firsts, p = _run(tok, ids, step=step)
    whole = _whole(tok, ids)
    want = [(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(CALLS[case])]
    assert not whole.malformed and text == "" and whole.text == ""
    assert [(c.name, c.arguments) for c in whole.calls] == want      # arguments exactly as written
    assert [(n, a) for _, n, a in streamed] == want
    assert [c.id for c in p.calls] == [i for i, _, _ in streamed]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in whole.calls)
    assert [d.index for d in firsts] == list(range(len(want)))


def test_text_before_the_calls_is_content(tok):
    ids = _ids(tok, "Let me look that up.", CALLS["one"])
    text, streamed, _, p = _run(tok, ids)
    assert text.strip() == "Let me look that up." and p.text == text
    assert [n for _, n, _ in streamed] == ["get_weather"] and len(p.calls) == 1


def test_an_answer_without_calls_is_text_and_stop_strings_cut_it(tok):
    text, streamed, _, p = _run(tok, _ids(tok, "Plain words here. And more"), stop=(". And",))
    assert text.strip() == "Plain words here" and streamed == [] and p.calls == [] and p.stopped
    assert not _whole(tok, _ids(tok, "no calls at all")).malformed


def test_a_head_in_another_order_comes_whole(tok):
    ids = _ids(tok, "", '[{"arguments": {"k": [1, 2]}, "name": "late"}]')
    _, streamed, _, p = _run(tok, ids)
    assert [(c.name, c.arguments) for c in p.calls] == [("late", '{"k": [1, 2]}')]
    assert [(n, a) for _, n, a in streamed] == [("late", '{"k": [1, 2]}')]


@pytest.mark.parametrize("calls", [
    "this is not JSON at all",
    '{"name": "f", "arguments": {}}',                    # an object, not the list
    '[{"name": "f", "arguments": [1, 2]}]',              # arguments must be an object
    '[{"name": 3, "arguments": {}}]',
    '[{"name": "f", "arguments": {}, "extra": 1}]',
    '[{"name": "f", "arguments": {}}] trailing words',
    '[{"name": "f", "arguments": {}},, ]',
])
def test_malformed_call_text_is_returned_as_content(tok, calls):
    ids = _ids(tok, "", calls)
    whole = _whole(tok, ids)
    assert whole.malformed and whole.calls == []
    assert whole.text.strip().replace(" ", "") == calls.replace(" ", "")
    text, streamed, _, p = _run(tok, ids)                # streaming never raises either
    assert p.malformed and p.calls == []
    if not streamed:                                     # nothing went out as a call: all of it is content
        assert text == whole.text


def test_a_call_cut_short_is_content_in_the_whole_answer(tok):
    cut = CALLS["one"][:40]
    whole = _whole(tok, _ids(tok, "", cut))
    assert whole.malformed and whole.calls == [] and whole.text.replace(" ", "") == cut.replace(" ", "")
    _, streamed, _, p = _run(tok, _ids(tok, "", cut))
    assert p.calls == [] and [n for _, n, _ in streamed] == ["get_weather"]   # the head had gone out


def test_call_ids_are_nine_alphanumerics():
    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
