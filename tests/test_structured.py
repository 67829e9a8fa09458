"""pixtral_rt.structured without a model: the Constraint (picklable, hashable, text only), the masks its
matchers fill (bit layout, ids past the tokenizer never allowed, EOS when complete, [TOOL_CALLS] where the
format wants it), accept / is_stopped, the batched fill against one-by-one fills, the compile cache, and
schemas it cannot compile refused naming the part. Random walks through every grammar on the three tokenizer
layouts (tekken v3, SentencePiece v7m1, tekken v7): each complete walk decodes to output the tool-call parser
reads back and jsonschema validates."""
from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest

pytest.importorskip("llguidance", reason="structured output needs llguidance (the serve extra, which the test "
                                         "extra includes)")
jsonschema = pytest.importorskip("jsonschema", reason="the test extra installs jsonschema")

from pixtral_rt.chat import load_tokenizer  # noqa: E402
from pixtral_rt.config import MISTRAL_SMALL_31, PIXTRAL_12B, PIXTRAL_LARGE  # noqa: E402
from pixtral_rt.errors import ConstraintError, PixtralInputError  # noqa: E402
from pixtral_rt.structured import Constraint, check_constraint, fill_bitmasks, make_matcher  # noqa: E402
from pixtral_rt.structured.matcher import _compiled  # noqa: E402
from pixtral_rt.structured.tool_calls import ToolCallStream  # noqa: E402
from tests.structured_cases import schema, tools  # noqa: E402
from tests.test_chat import _small31_folder  # noqa: E402

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7}}}


@pytest.fixture(scope="module", params=["v3-tekken", "v7-sentencepiece", "v7-tekken"])
def tok(request, tmp_path_factory):
    if request.param == "v3-tekken":
        return load_tokenizer(None, PIXTRAL_12B)
    if request.param == "v7-sentencepiece":
        pytest.importorskip("sentencepiece", reason="Pixtral-Large's v7m1 tokenizer needs sentencepiece")
        return load_tokenizer(None, PIXTRAL_LARGE)
    return load_tokenizer(_small31_folder(tmp_path_factory.mktemp("small31")), MISTRAL_SMALL_31)


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer(None, PIXTRAL_12B)


def _allowed(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def _walk(m, rng: random.Random, eos: int, limit: int = 400) -> list[int]:
    """Uniformly random allowed tokens until the grammar is complete (EOS taken only when nothing else is)."""
    out, row = [], np.zeros(m.words, np.int32)
    while not m.is_stopped() and len(out) < limit:
        m.fill_bitmask(row)
        ids = _allowed(row)
        assert len(ids), "a grammar that is not complete must allow some token"
        others = [int(t) for t in ids if t != eos]
        if not others or (eos in ids and rng.random() < 0.3):
            assert eos in ids
            break
        t = rng.choice(others)
        m.accept(t)
        out.append(t)
    return out


def test_constraint_is_text_hashable_and_picklable():
    c = Constraint.tool_calls([{"name": "f", "parameters": WEATHER}], "required", parallel=False)
    again = Constraint.tool_calls([{"name": "f", "parameters": WEATHER}], "required", parallel=False)
    assert c == again and hash(c) == hash(again) and pickle.loads(pickle.dumps(c)) == c
    assert all(isinstance(getattr(c, f), (str, bool)) for f in c.__dataclass_fields__)
    assert c != Constraint.tool_calls([{"name": "f", "parameters": WEATHER}], "required", parallel=True)
    with pytest.raises(ValueError, match="kind"):
        Constraint(kind="xml")
    with pytest.raises(ValueError, match="choice"):
        Constraint(kind="tool_calls", tools="[]", choice="sometimes")


def test_mask_layout_extra_ids_and_eos(tekken):
    """Bit v & 31 of word v >> 5; a model vocab wider than the tokenizer's gets zero words at the end; a
    json_object grammar that has just closed allows EOS."""
    vocab = 131072 + 100                                    # 4 more words than tekken's 4096
    m = make_matcher(Constraint.json_object(), tekken, vocab)
    row = np.full((vocab + 31) // 32, -1, np.int32)
    m.fill_bitmask(row)
    assert row.shape == (4100,) and (row[4096:] == 0).all()
    ids = _allowed(row)
    raw = tekken.instruct_tokenizer.tokenizer
    assert len(ids) and all(raw.decode([int(t)]).lstrip().startswith("{") for t in ids[:50])
    brace = raw.encode("{}", bos=False, eos=False)
    assert len(brace) == 1 and brace[0] in ids
    assert raw.eos_id not in ids                             # an empty answer is not a JSON object
    m.accept(brace[0])
    assert m.is_stopped()                                    # "{}" is complete and nothing can follow
    m.fill_bitmask(row)
    assert list(_allowed(row)) == [raw.eos_id]


def test_accept_refuses_a_token_outside_the_mask_naming_it(tekken):
    m = make_matcher(Constraint.json_schema(WEATHER), tekken, 131072)
    bad = tekken.instruct_tokenizer.tokenizer.encode("hello", bos=False, eos=False)[0]
    with pytest.raises(ValueError, match=f"token {bad} "):
        m.accept(bad)
    with pytest.raises(ValueError, match="token 131072 is outside"):
        m.accept(131072)
    good = tekken.instruct_tokenizer.tokenizer.encode('{"', bos=False, eos=False)[0]
    m.accept(good)                                           # the refusals left the matcher usable


def test_required_tool_call_starts_with_the_tool_calls_token_and_none_never_allows_it(tok):
    tc = tok.instruct_tokenizer.TOOL_CALLS
    vocab = tok.instruct_tokenizer.tokenizer.n_words
    row = np.zeros((vocab + 31) // 32, np.int32)
    tl = [{"name": "get_weather", "parameters": WEATHER}]
    make_matcher(Constraint.tool_calls(tl, "required"), tok, vocab).fill_bitmask(row)
    assert list(_allowed(row)) == [tc]
    make_matcher(Constraint.tool_calls(tl, "auto"), tok, vocab).fill_bitmask(row)
    auto = _allowed(row)
    assert tc in auto and len(auto) > 1000                   # a call, or text
    special = set(_compiled(tok).vocab.special_ids)
    assert not (set(auto.tolist()) - {tc}) & special        # text admits no control token ([IMG], [INST], ...)
    m = make_matcher(Constraint.tool_calls(tl, "none"), tok, vocab)
    rng = random.Random(0)
    for _ in range(20):
        m.fill_bitmask(row)
        ids = _allowed(row)
        assert tc not in ids
        t = rng.choice([int(i) for i in ids if i != tok.instruct_tokenizer.tokenizer.eos_id])
        m.accept(t)


def test_fill_bitmasks_equals_one_by_one(tekken):
    cs = [Constraint.json_schema(schema(random.Random(i))) for i in range(5)] + [Constraint.json_object()]
    ms = [make_matcher(c, tekken, 131072) for c in cs]
    rng = random.Random(1)
    for m in ms:                                            # advance each a few tokens, to different states
        row = np.zeros(4096, np.int32)
        for _ in range(rng.randint(0, 4)):
            m.fill_bitmask(row)
            ids = [int(t) for t in _allowed(row) if t != 2]
            if not ids or m.is_stopped():
                break
            m.accept(rng.choice(ids))
    batch = np.full((len(ms) + 2, 4096), 7, np.int32)
    fill_bitmasks(ms, batch)
    for i, m in enumerate(ms):
        one = np.zeros(4096, np.int32)
        m.fill_bitmask(one)
        assert np.array_equal(batch[i], one), i
    assert (batch[len(ms):] == 7).all()                     # rows past the matchers untouched
    with pytest.raises(ValueError, match="shape"):
        fill_bitmasks(ms, np.zeros((2, 4096), np.int32))


def test_a_repeated_schema_compiles_once(tekken):
    c = Constraint.json_schema({"type": "object", "properties": {"unique_to_this_test": {"type": "integer"}}})
    comp = _compiled(tekken)
    before = len(comp.templates)
    check_constraint(c, tekken)
    first = comp.templates[c]
    for _ in range(3):
        make_matcher(c, tekken, 131072)
    assert len(comp.templates) == before + 1 and comp.templates[c] is first
    assert comp.compile_s[c] > 0


@pytest.mark.parametrize("bad,param,why", [
    (Constraint.json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}),
     "response_format.json_schema.schema", "strin"),
    (Constraint.json_schema({"type": "array", "uniqueItems": True}), "response_format.json_schema.schema",
     "uniqueItems"),
    (Constraint.tool_calls([{"name": "ok", "parameters": WEATHER},
                            {"name": "broken", "parameters": {"type": "object", "properties": {
                                "x": {"$ref": "#/$defs/missing"}}}}]), "tools[1].function.parameters", "missing"),
    (Constraint.tool_calls([{"name": "f", "parameters": {"type": "string", "format": "no-such-format"}}]),
     "tools[0].function.parameters", "no-such-format"),
])
def test_a_schema_the_library_cannot_enforce_is_refused_naming_the_part(tekken, bad, param, why):
    with pytest.raises(ConstraintError) as e:
        check_constraint(bad, tekken)
    assert isinstance(e.value, PixtralInputError) and e.value.status == 400
    assert e.value.param == param and str(e.value).startswith(param) and why in str(e.value)


def test_random_walks_are_valid_answers_on_every_tokenizer(tok):
    """Uniformly random paths through each grammar (no model: the grammar alone decides) decode to JSON that
    validates, and tool calls that the parser reads back with arguments that validate."""
    eos = tok.instruct_tokenizer.tokenizer.eos_id
    vocab = tok.instruct_tokenizer.tokenizer.n_words
    done = 0
    for seed in range(12):
        rng = random.Random(seed)
        s = schema(rng)
        out = _walk(make_matcher(Constraint.json_schema(s), tok, vocab), rng, eos)
        text = tok.decode(out)
        jsonschema.validate(json.loads(text), s)
        tl = [t["function"] for t in tools(rng)]
        c = Constraint.tool_calls(tl, "required", parallel=seed % 2 == 0)
        out = _walk(make_matcher(c, tok, vocab), rng, eos)
        parsed = ToolCallStream(tok)
        parsed.add(out)
        parsed.finish()
        assert not parsed.malformed, tok.decode(out)
        assert len(parsed.calls) >= 1 and (seed % 2 == 0 or len(parsed.calls) == 1)
        by_name = {t["name"]: t["parameters"] for t in tl}
        for call in parsed.calls:
            jsonschema.validate(json.loads(call.arguments), by_name[call.name])
        done += 1
    assert done == 12
