"""POST /v1/completions, /tokenize and /detokenize over the tiny CPU engine (random weights, fp32), served by
uvicorn in a thread (tests/test_serve_app.live) and called with httpx and the official `openai` client.

The oracle of a completion is the engine itself, fed the same token ids without the HTTP layer (so the
route's tokenisation, BOS, sampling mapping and text assembly are what is checked); /tokenize on messages
is checked against what the chat route reports as prompt_tokens for the same messages, image included."""
from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install -e '.[serve]'), which "
                                      "the test extra includes")
import openai  # noqa: E402

from pixtral_rt.chat import EncodedRequest  # noqa: E402
from pixtral_rt.images import ImageLimits, OpenedImage  # noqa: E402
from pixtral_rt.sampling import SamplingParams  # noqa: E402
from pixtral_rt.server.app import build_app  # noqa: E402
from pixtral_rt.server.completion import TokenText  # noqa: E402
from pixtral_rt.server.completions_protocol import (COMPLETION_NOT_HONOURED, TOKENIZE_NOT_HONOURED,  # noqa: E402
                                                    CompletionRequest, TokenizeRequest)
from pixtral_rt.serving.llm_engine import LLMEngine  # noqa: E402
from pixtral_rt.serving.outputs import GenerationResult  # noqa: E402
from tests.test_serve_app import live  # noqa: E402

MODEL = "tiny"


def _png(h=40, w=56, seed=0) -> str:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


@pytest.fixture(scope="module")
def eng():
    e = LLMEngine.load(None, device="cpu", max_batch=8, max_context=1024, kv_tokens=64 * 160, page_size=16,
                       progress=False)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def url(eng):
    with live(build_app(eng, MODEL, image_limits=ImageLimits(allow_local_files=False, allow_private_urls=False))) as u:
        yield u


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _raw(eng):
    return eng.tokenizer.instruct_tokenizer.tokenizer


def _engine_tokens(eng, ids: list[int], params: SamplingParams) -> GenerationResult:
    """The engine's own answer to exactly these prompt ids (no HTTP, no text-prompt code)."""
    req = EncodedRequest(tokens=ids, images=[], patch_grids=[], image_token_positions=[], cu_seqlens=[0],
                         prompt_tokens=len(ids), max_tokens=params.max_tokens)
    res = GenerationResult()
    for _ in eng.stream(None, params, req=req, result=res):
        pass
    return res


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def _post(http, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _sse_objects(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ----------------------------------------------------------------------------- /v1/completions
def test_greedy_completion_equals_the_engine_on_the_same_ids(eng, http):
    """A string prompt is its tokenizer ids with BOS first and no chat format; the answer is the engine's."""
    prompt = "The quick brown fox [INST] jumps"          # a control-token name typed as text stays text
    ids = list(_raw(eng).encode(prompt, bos=True, eos=False))
    assert ids[0] == _raw(eng).bos_id and 3 not in ids   # 3: [INST]
    want = _engine_tokens(eng, ids, SamplingParams(max_tokens=12))
    assert len(want.token_ids) == 12
    r = _post(http, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                        "logprobs": 0})
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == MODEL
    (c,) = r["choices"]
    assert c["index"] == 0 and c["finish_reason"] == "length" and c["text"] == want.text
    assert c["logprobs"]["tokens"] == [TokenText(eng.tokenizer).of(t)[0] for t in want.token_ids]
    assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == 12
    assert r["usage"]["total_tokens"] == len(ids) + 12
    # the same ids given as a token list: the same answer; without BOS: the engine's answer to ids[1:]
    as_ids = _post(http, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0})
    assert as_ids["choices"][0]["text"] == want.text and as_ids["usage"]["prompt_tokens"] == len(ids)
    no_bos = _post(http, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                             "add_special_tokens": False})
    assert no_bos["usage"]["prompt_tokens"] == len(ids) - 1
    assert no_bos["choices"][0]["text"] == _engine_tokens(eng, ids[1:], SamplingParams(max_tokens=12)).text


def test_streamed_chunks_concatenate_to_the_whole_answer(http):
    body = {"prompt": "Once upon a time", "max_tokens": 10, "n": 2, "seed": 5, "temperature": 0.9, "logprobs": 2}
    whole = _post(http, "/v1/completions", body)
    chunks = _sse_objects(http.post("/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}))
    assert all(ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"] for ch in chunks)
    for i, want in enumerate(whole["choices"]):
        mine = [c for ch in chunks for c in ch["choices"] if c["index"] == i]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [want["finish_reason"]]
        assert mine[-1]["finish_reason"] == want["finish_reason"]          # and nothing after it
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            got = [x for c in mine if c["logprobs"] for x in c["logprobs"][key]]
            assert got == pytest.approx(want["logprobs"][key]) if key == "token_logprobs" else got == \
                want["logprobs"][key], key
    assert whole["choices"][0]["text"] != whole["choices"][1]["text"]       # seed + index: different draws
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 20
    # without include_usage no chunk carries a usage key
    plain = _sse_objects(http.post("/v1/completions", json={**body, "stream": True}))
    assert all("usage" not in ch for ch in plain)


def test_the_openai_client(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, seed=1)
    assert r.object == "text_completion" and len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].text, str) and r.usage.completion_tokens == 6
    stream = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 131072], max_tokens=2)
    assert e.value.body["param"] == "prompt[1]"


def test_several_prompts_number_their_choices_and_each_equals_its_prompt_alone(eng, http):
    """prompt k's choice j is choice k * n + j, and samples what prompt k alone samples (seed + j)."""
    prompts = ["Red green blue", "One two three"]
    body = {"max_tokens": 7, "n": 2, "seed": 3, "temperature": 1.0}
    both = _post(http, "/v1/completions", {**body, "prompt": prompts})
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    alone = [_post(http, "/v1/completions", {**body, "prompt": p}) for p in prompts]
    assert [c["text"] for c in both["choices"]] == [c["text"] for a in alone for c in a["choices"]]
    assert both["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert both["usage"]["completion_tokens"] == 4 * 7
    tokens = [list(_raw(eng).encode(p, bos=True, eos=False)) for p in prompts]
    as_ids = _post(http, "/v1/completions", {**body, "prompt": tokens})
    assert [c["text"] for c in as_ids["choices"]] == [c["text"] for c in both["choices"]]


def test_legacy_logprobs(http):
    r = _post(http, "/v1/completions", {"prompt": "Numbers:", "max_tokens": 8, "temperature": 0, "logprobs": 3})
    lp, text = r["choices"][0]["logprobs"], r["choices"][0]["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 8
    offset = 0
    for tok, chosen, top, off in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]):
        assert off == offset
        offset += len(tok)
        assert 1 <= len(top) <= 4 and top[tok] == pytest.approx(chosen)   # the chosen token is always listed
        assert chosen == pytest.approx(max(top.values())) and chosen <= 0  # greedy: the most likely
    if not any("\ufffd" in t for t in lp["tokens"]):     # no token holds part of a character
        assert "".join(lp["tokens"]) == text
    none = _post(http, "/v1/completions", {"prompt": "Numbers:", "max_tokens": 8, "temperature": 0})
    assert none["choices"][0]["logprobs"] is None and none["choices"][0]["text"] == text


def test_echo_puts_the_prompt_before_the_answer(eng, http):
    ids = list(_raw(eng).encode("Echo me", bos=True, eos=False))
    for prompt, shown in (("Echo me", "Echo me"), (ids, eng.tokenizer.decode(ids))):
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0}
        answer = _post(http, "/v1/completions", body)["choices"][0]["text"]
        echoed = _post(http, "/v1/completions", {**body, "echo": True})["choices"][0]["text"]
        assert shown and echoed == shown + answer
        chunks = _sse_objects(http.post("/v1/completions", json={**body, "echo": True, "stream": True}))
        assert chunks[0]["choices"][0]["text"] == shown
        assert "".join(c["text"] for ch in chunks for c in ch["choices"]) == echoed


def test_stop_strings_cut_the_answer(http):
    body = {"prompt": "Write:", "max_tokens": 12, "temperature": 0}
    full = _post(http, "/v1/completions", body)["choices"][0]["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip()
    cut = _post(http, "/v1/completions", {**body, "stop": stop})["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(stop)]


# ----------------------------------------------------------------------------- /tokenize, /detokenize
def test_tokenize_and_detokenize_a_prompt(eng, http):
    prompt = "Tokens, please: [IMG] stays text"
    ids = list(_raw(eng).encode(prompt, bos=True, eos=False))
    r = _post(http, "/tokenize", {"model": MODEL, "prompt": prompt})
    assert r == {"count": len(ids), "max_model_len": eng.max_context, "tokens": ids, "token_strs": None}
    assert 10 not in ids                                   # 10: [IMG]
    no_bos = _post(http, "/tokenize", {"prompt": prompt, "add_special_tokens": False, "return_token_strs": True})
    assert no_bos["tokens"] == ids[1:] and "".join(no_bos["token_strs"]) == prompt
    assert _post(http, "/detokenize", {"model": MODEL, "tokens": ids}) == {"prompt": prompt}  # BOS left out
    assert _post(http, "/detokenize", {"tokens": []}) == {"prompt": ""}


def test_tokenize_messages_counts_what_the_chat_route_reports(eng, http, monkeypatch):
    """Image tokens included, and the image never decoded (only its header is read)."""
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "Noise."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                             {"type": "image_url", "image_url": _png(70, 30, 1)}]}]
    chat = _post(http, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    with monkeypatch.context() as m:
        def no_decode(self):
            raise AssertionError("/tokenize decoded an image")
        m.setattr(OpenedImage, "decode", no_decode)
        r = _post(http, "/tokenize", {"messages": messages, "return_token_strs": True})
    assert r["count"] == len(r["tokens"]) == chat["usage"]["prompt_tokens"]
    assert r["tokens"][0] == _raw(eng).bos_id and r["tokens"].count(10) > 0         # [IMG] tokens counted
    assert r["token_strs"][:2] == ["<s>", "[INST]"]
    text_only = _post(http, "/tokenize", {"messages": [{"role": "user", "content": "What is this?"}]})
    assert text_only["count"] < r["count"] - r["tokens"].count(10)


def test_tokenize_messages_with_tools_counts_what_the_chat_route_reports(http):
    """[AVAILABLE_TOOLS] and the tools' JSON are part of the prompt the chat route builds: counted too."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "weather at a place",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    chat = _post(http, "/v1/chat/completions", {"messages": messages, "tools": tools, "tool_choice": "none",
                                                "max_tokens": 1})
    with_tools = _post(http, "/tokenize", {"messages": messages, "tools": tools})
    without = _post(http, "/tokenize", {"messages": messages})
    assert with_tools["count"] == chat["usage"]["prompt_tokens"] > without["count"]


# ----------------------------------------------------------------------------- errors
BAD = [
    ("/tokenize", {"prompt": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, None,
     "invalid_value"),
    ("/v1/completions", {"prompt": [1, -1]}, 400, "prompt[1]", "invalid_request"),
    ("/v1/completions", {"prompt": [1, 131072]}, 400, "prompt[1]", "invalid_request"),
    ("/v1/completions", {"prompt": [[1, 2], [1, 10, 4]]}, 400, "prompt[1][1]", "invalid_request"),   # [IMG]
    ("/v1/completions", {"prompt": [1, True]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": ["a", [1, 2]]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "", "add_special_tokens": False}, 400, "prompt", "invalid_request"),
    ("/v1/completions", {"prompt": ["a", ""], "add_special_tokens": False}, 400, "prompt[1]", "invalid_request"),
    ("/v1/completions", {"prompt": ["a"] * 65}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": ["a"] * 32, "n": 9}, 400, "n", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "echo": True, "logprobs": 1}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": ["a", "b " * 1100]}, 400, "prompt[1]", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-3.5-turbo-instruct"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "a", "messages": []}, 400, "messages", "unknown_parameter"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, None, "invalid_value"),
    ("/tokenize", {}, 400, None, "invalid_value"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_special_tokens": True}, 400, None,
     "invalid_value"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": False}, 400,
     "add_generation_prompt", "unsupported_parameter"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;"
                                                              "base64,AAAA"}]}]}, 400, "messages[0].content[0]",
     "invalid_image"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}] * 13}]}, 413,
     "messages", "too_many_images"),
    ("/tokenize", {"messages": [{"role": "bot", "content": "a"}]}, 400, "messages[0].role", "invalid_value"),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model", "model_not_found"),
    ("/detokenize", {"tokens": [5, -1]}, 400, "tokens[1]", "invalid_request"),
    ("/detokenize", {"tokens": [131072]}, 400, "tokens[0]", "invalid_request"),
    ("/detokenize", {"tokens": [1, "7"]}, 400, "tokens[1]", "invalid_request"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens", "invalid_value"),
    ("/detokenize", {"tokens": [1], "skip_special_tokens": False}, 400, "skip_special_tokens", "unknown_parameter"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD)
def test_bad_requests_get_openai_errors_naming_the_input(http, path, body, status, param, code):
    err = _error(http.post(path, json=body), status)
    assert (err["param"], err["code"]) == (param, code), err
    if param is not None and code not in ("model_not_found", "too_many_images"):   # those say it in words
        assert err["message"].startswith(f"{param}: "), err
    if code == "context_length_exceeded":
        assert "1024" in err["message"] and "max_tokens" in err["message"]


def test_the_tables_and_the_models_never_both_claim_a_field():
    for table, model in ((COMPLETION_NOT_HONOURED, CompletionRequest), (TOKENIZE_NOT_HONOURED, TokenizeRequest)):
        both = set(table) & set(model.model_fields)
        assert not both, f"{model.__name__}: {both} are fields and in its table"
    # a harmless value of a listed field is accepted and changes nothing
    assert CompletionRequest.model_validate({"prompt": "a", "best_of": 1, "user": "u", "suffix": ""}).prompts == ["a"]


# ----------------------------------------------------------------------------- sampling controls over HTTP
def test_sampling_controls_reach_the_sampler_from_both_routes(eng, http):
    forced = TokenText(eng.tokenizer).of(1000)[0]
    chat = _post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                                 "temperature": 0, "logit_bias": {"1000": 100}, "logprobs": True})
    assert [t["token"] for t in chat["choices"][0]["logprobs"]["content"]] == [forced] * 5
    # min_tokens holds back the biased stop id for 3 tokens, then it ends the answer (and is not emitted)
    body = {"prompt": "x", "max_tokens": 8, "temperature": 0, "logprobs": 0, "min_tokens": 3,
            "logit_bias": {"1000": 100, "77": 99}, "stop_token_ids": [1000]}
    r = _post(http, "/v1/completions", body)
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 3
    assert r["choices"][0]["logprobs"]["tokens"] == [TokenText(eng.tokenizer).of(77)[0]] * 3
    plain = {"prompt": "Again and again and again", "max_tokens": 16, "temperature": 0}
    a = _post(http, "/v1/completions", plain)["choices"][0]["text"]
    b = _post(http, "/v1/completions", {**plain, "frequency_penalty": 2, "presence_penalty": 1,
                                        "repetition_penalty": 1.5})["choices"][0]["text"]
    assert a != b


@pytest.mark.parametrize("path,body,param,code", [
    ("/v1/completions", {"prompt": "a", "frequency_penalty": 2.1}, "frequency_penalty", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"5": -101}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"131072": 1}}, "logit_bias", "invalid_request"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [1, -2]}, "stop_token_ids", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "stop_token_ids": [1, 131072]}, "stop_token_ids[1]", "invalid_request"),
    ("/v1/completions", {"prompt": "a", "min_tokens": 17}, "min_tokens", "invalid_value"),    # default max 16
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "repetition_penalty": -1},
     "repetition_penalty", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "min_tokens": 2000},
     "min_tokens", "invalid_value"),
])
def test_bad_sampling_controls_are_400_naming_the_field(http, path, body, param, code):
    err = _error(http.post(path, json=body), 400)
    assert (err["param"], err["code"]) == (param, code), err
    assert err["message"].startswith(f"{param}: "), err
