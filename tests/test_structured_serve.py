"""Tool calls and structured output through the HTTP server and the real engine, on the tiny random model
(CPU): with random weights the grammar does all the work, so every answer that finishes must be valid.

- 50 seeded requests with tool_choice "required" and random tools with nested parameter schemas (and 8
  more with seeded sampling): each
  answer is a parsable call of an offered tool whose arguments validate (jsonschema); the same requests
  streamed give the same calls, the argument fragments concatenating to the whole answer's arguments. A
  call that max_tokens cuts must end with finish_reason "length"; most must finish.
- 50 seeded json_schema requests (nested objects, arrays, enums, bounded numbers, required and optional
  keys): every finished output parses and validates; json_object outputs parse.
- auto / none / a named function; the openai client reading streamed and whole tool calls; a conversation
  with a tool result; bad schemas, an unknown tool_choice function and a v3 image in a tool message: 400
  naming the part.
Requests run 8 at a time (the engine's batch); the 50-request runs are greedy, seeded sampling has
smaller runs of its own."""
from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install -e '.[serve]'), which "
                                      "the test extra includes")
pytest.importorskip("llguidance", reason="structured output needs llguidance (the serve extra)")
jsonschema = pytest.importorskip("jsonschema", reason="the test extra installs jsonschema")

from pixtral_rt.server.app import build_app  # noqa: E402
from pixtral_rt.serving.llm_engine import LLMEngine  # noqa: E402
from tests.structured_cases import schema, tools  # noqa: E402
from tests.test_serve_app import live  # noqa: E402

N = 50
MAX_TOKENS = 64
MOST = 0.8          # at least this share of the answers must finish within MAX_TOKENS


@pytest.fixture(scope="module")
def server():
    eng = LLMEngine.load(None, device="cpu", max_batch=8, max_context=2048, progress=False)
    try:
        with live(build_app(eng, "tiny")) as url, httpx.Client(base_url=url, timeout=300) as client:
            yield client, url
    finally:
        eng.shutdown()


GREEDY = {"temperature": 0.0}


def _tool_request(i: int, sampling: dict = GREEDY) -> dict:
    rng = random.Random(i)
    return {"messages": [{"role": "user", "content": f"Request {i}: use one of the tools."}], "tools": tools(rng),
            "tool_choice": "required", "parallel_tool_calls": i % 10 == 0, "max_tokens": MAX_TOKENS, **sampling}


def _events(client: httpx.Client, body: dict) -> list[dict]:
    out = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def _streamed_calls(events: list[dict]) -> tuple[list[tuple[str, str, str]], str, str | None]:
    """(calls as (id, name, arguments), content, finish_reason) assembled from a stream's chunks."""
    calls, content, finish = {}, "", None
    for ev in events:
        assert "error" not in ev, ev
        for ch in ev["choices"]:
            delta = ch["delta"]
            content += delta.get("content") or ""
            for d in delta.get("tool_calls") or []:
                if "id" in d:                       # a call's first delta: id, type, name, arguments ""
                    assert d["type"] == "function" and d["function"]["arguments"] == "" and d["index"] not in calls
                    calls[d["index"]] = [d["id"], d["function"]["name"], ""]
                else:
                    assert set(d["function"]) == {"arguments"}
                    calls[d["index"]][2] += d["function"]["arguments"]
            finish = ch["finish_reason"] or finish
    return [tuple(calls[k]) for k in sorted(calls)], content, finish


def _check_calls(calls, offered: list[dict], parallel: bool) -> None:
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in offered}
    assert calls and (parallel or len(calls) == 1)
    for cid, name, arguments in calls:
        assert re.fullmatch(r"[A-Za-z0-9]{9}", cid), cid
        assert name in by_name, name
        jsonschema.validate(json.loads(arguments), by_name[name])


def _required_calls(client, bodies: list[dict]) -> int:
    """Each body asked whole and streamed: checks both answers; returns how many finished with calls."""
    with ThreadPoolExecutor(8) as ex:
        whole = list(ex.map(lambda b: client.post("/v1/chat/completions", json=b), bodies))
        streamed = list(ex.map(lambda b: _events(client, b), bodies))
    finished = 0
    for body, r, events in zip(bodies, whole, streamed):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        msg, finish = choice["message"], choice["finish_reason"]
        s_calls, s_content, s_finish = _streamed_calls(events)
        assert s_finish == finish
        if finish == "length":                      # cut by max_tokens: not a call, said so
            assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS and msg.get("tool_calls") is None
            continue
        assert finish == "tool_calls" and msg["content"] is None, choice
        calls = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
        assert all(c["type"] == "function" for c in msg["tool_calls"])
        _check_calls(calls, body["tools"], body["parallel_tool_calls"])
        assert [c[1:] for c in s_calls] == [c[1:] for c in calls] and s_content == ""
        _check_calls(s_calls, body["tools"], body["parallel_tool_calls"])
        finished += 1
    return finished


def test_required_tool_calls_are_valid_and_streaming_gives_the_same_calls(server):
    """Greedy: a batch of greedy requests skips the sampler's sort (CPU time); seeded sampling: next test."""
    finished = _required_calls(server[0], [_tool_request(i) for i in range(N)])
    print(f"required, greedy: {finished} of {N} finished within {MAX_TOKENS} tokens")
    assert finished >= MOST * N, f"only {finished} of {N} answers finished within {MAX_TOKENS} tokens"


def test_sampled_tool_calls_are_valid_and_streaming_gives_the_same_calls(server):
    bodies = [_tool_request(100 + i, {"temperature": 1.0, "seed": i}) for i in range(8)]
    finished = _required_calls(server[0], bodies)
    print(f"required, sampled: {finished} of {len(bodies)} finished within {MAX_TOKENS} tokens")
    assert finished >= MOST * len(bodies), f"only {finished} of {len(bodies)} finished within {MAX_TOKENS} tokens"


def test_json_schema_outputs_parse_and_validate_and_json_objects_parse(server):
    client, _ = server

    def ask(i: int):
        s = schema(random.Random(1000 + i))
        body = {"messages": [{"role": "user", "content": f"Answer {i} in JSON."}], "max_tokens": MAX_TOKENS,
                "response_format": {"type": "json_schema", "json_schema": {"name": f"answer_{i}", "schema": s,
                                                                           "strict": True}}, **GREEDY}
        return s, client.post("/v1/chat/completions", json=body)

    # json_object: sampled (greedy random weights never close a free object: they repeat a key's text)
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(ask, range(N)))
        objects = list(ex.map(lambda i: client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"JSON please {i}"}], "max_tokens": 16,
            "response_format": {"type": "json_object"}, "temperature": 1.0, "seed": i}), range(8)))
    finished = 0
    for s, r in results:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        if choice["finish_reason"] == "length":
            continue
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), s)
        finished += 1
    print(f"json_schema: {finished} of {N} finished within {MAX_TOKENS} tokens")
    assert finished >= MOST * N, f"only {finished} of {N} answers finished within {MAX_TOKENS} tokens"
    # a free JSON object from random weights often runs past max_tokens: a finished one must parse, a cut one
    # must still be the beginning of a JSON object (the grammar accepts all of its tokens)
    from pixtral_rt.chat import load_tokenizer
    from pixtral_rt.config import tiny
    from pixtral_rt.structured import Constraint, make_matcher
    tok = load_tokenizer(None, tiny())
    finished = 0
    for r in objects:
        choice = r.json()["choices"][0]
        text = choice["message"]["content"]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
            continue
        assert choice["finish_reason"] == "length"
        m = make_matcher(Constraint.json_object(), tok, 131072)
        for t in tok.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False):
            m.accept(t)                             # raises if the text left the grammar
    assert finished >= 1


def test_auto_none_and_a_named_function(server):
    client, _ = server
    offered = tools(random.Random(7))
    names = {t["function"]["name"] for t in offered}
    msgs = [{"role": "user", "content": "Maybe call a tool."}]
    name = sorted(names)[-1]
    named = {"type": "function", "function": {"name": name}}
    bodies = [{"messages": msgs, "tools": offered, "tool_choice": choice, "max_tokens": 24, "temperature": 1.0,
               "seed": i, "parallel_tool_calls": choice != named} for choice in ("auto", "none", named)
              for i in range(4)]
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda b: client.post("/v1/chat/completions", json=b).json(), bodies))
    named_calls = 0
    for body, r in zip(bodies, answers):
        c = r["choices"][0]
        calls = [(t["id"], t["function"]["name"], t["function"]["arguments"]) for t in c["message"].get("tool_calls")
                 or []]
        if body["tool_choice"] == "none":
            assert not calls and c["finish_reason"] in ("stop", "length")
        elif calls:                                 # a call, then a valid one
            assert c["finish_reason"] == "tool_calls"
            _check_calls(calls, offered, body["parallel_tool_calls"])
            if body["tool_choice"] == named:
                assert [n for _, n, _ in calls] == [name]
                named_calls += 1
        else:                                       # auto: text; named: a call cut by max_tokens
            assert c["finish_reason"] in (("stop", "length") if body["tool_choice"] == "auto" else ("length",))
            assert isinstance(c["message"]["content"], str)
    assert named_calls >= 1


def test_the_openai_client_reads_tool_calls_whole_and_streamed(server):
    openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
    _, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    tl = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}}]
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=tl, tool_choice="required",
              parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0)
    whole = client.chat.completions.create(**kw)
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    args, name, finish = "", None, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            name = d.function.name or name
            args += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, args, finish) == ("get_weather", call.function.arguments, "tool_calls")


def test_a_conversation_with_a_tool_result(server):
    client, _ = server
    tl = tools(random.Random(3))
    fn = tl[0]["function"]["name"]
    msgs = [{"role": "user", "content": "Use the tool."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call00001", "type": "function", "function": {"name": fn, "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call00001", "name": fn, "content": '{"result": 42}'}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "tools": tl, "max_tokens": 8})
    assert r.status_code == 200, r.text
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    from pixtral_rt.chat import load_tokenizer
    from pixtral_rt.config import tiny
    want = load_tokenizer(None, tiny()).encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content="Use the tool."),
        AssistantMessage(tool_calls=[ToolCall(id="call00001", function=FunctionCall(name=fn, arguments="{}"))]),
        ToolMessage(tool_call_id="call00001", name=fn, content='{"result": 42}')],
        tools=[Tool(function=Function(**t["function"])) for t in tl]))
    assert r.json()["usage"]["prompt_tokens"] == len(want.tokens)


@pytest.mark.parametrize("extra,param,code", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}}, "response_format.json_schema.schema",
     "invalid_schema"),
    ({"tools": [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "bad", "parameters": {
                    "type": "object", "properties": {"s": {"type": "array", "uniqueItems": True}}}}}],
      "tool_choice": "required"}, "tools[1].function.parameters", "invalid_schema"),
    ({"tools": [{"type": "function", "function": {"name": "ok"}}],
      "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice.function.name",
     "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name",
     "invalid_value"),
])
def test_bad_tools_and_schemas_are_400_naming_the_part(server, extra, param, code):
    client, _ = server
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert err["message"].startswith(param)


def test_an_image_in_a_tool_result_is_refused_by_a_v3_model(server):
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": "Use the tool."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call00001", "type": "function", "function": {"name": "draw", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call00001", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    client, _ = server
    r = client.post("/v1/chat/completions", json={"messages": msgs, "tools": [
        {"type": "function", "function": {"name": "draw"}}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[2].content[0]" and "v3" in err["message"] and "user message" in err["message"]


def test_constraints_cross_into_the_engine_process():
    """The server's default engine runs in a process of its own (EngineClient): the Constraint travels pickled
    inside SamplingParams and is compiled again there; the answers are as valid as in-process."""
    from pixtral_rt.serving.engine_client import EngineClient
    eng = EngineClient.start(None, device="cpu", max_batch=4, max_context=2048, progress=False)
    try:
        with live(build_app(eng, "tiny")) as url, httpx.Client(base_url=url, timeout=300) as client:
            body = _tool_request(3)
            r = client.post("/v1/chat/completions", json=body)
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            _check_calls([(c["id"], c["function"]["name"], c["function"]["arguments"])
                          for c in choice["message"]["tool_calls"]], body["tools"], body["parallel_tool_calls"])
            assert [c[1:] for c in _streamed_calls(_events(client, body))[0]] == \
                [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]
            s = schema(random.Random(1001))
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "JSON"}], "max_tokens": MAX_TOKENS,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}})
            assert r.json()["choices"][0]["finish_reason"] == "stop"
            jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), s)
    finally:
        eng.shutdown()
