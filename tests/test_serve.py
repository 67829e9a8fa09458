"""`python -m pixtral_rt.serve` end to end on CPU: real server processes with the embedded tiny random model,
called with the official `openai` client and with httpx. Every request goes to 127.0.0.1 only: the servers,
and a local HTTP server that hosts a PNG for the image-URL tests. Each server is stopped at the end.

Servers: `plain` (defaults: no key, no local files, no private URLs; --max-images 3, --max-body-mb 1) and
`secure` (--api-key, --allowed-local-media-path, --allow-private-urls, --max-batch 1 --max-queue 1 so the
queue fills); the SIGTERM test starts its own.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pixtral_rt.chat import encode_request, load_tokenizer
from pixtral_rt.config import tiny
from tests.helpers import png_server

KEY = "test-key-123"
ERROR_KEYS = {"message", "type", "param", "code"}


def _png(h=30, w=40, seed=0) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, "PNG")
    return b.getvalue()


PNG = _png()
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `python -m pixtral_rt.serve` process on 127.0.0.1."""

    def __init__(self, env, log_path, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pixtral_rt.serve", "--device", "cpu", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning", *flags],
            env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server not healthy within 300 s: {self.log()}")

    def log(self) -> str:
        return open(self.log_path, encoding="utf-8", errors="replace").read()[-4000:]

    def client(self, api_key="unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e["PIXTRAL_RT_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # the random checkpoint, written once
    e.pop("PIXTRAL_RT_DEBUG", None)
    e.pop("PIXTRAL_RT_API_KEY", None)
    return e


@pytest.fixture(scope="module")
def plain(env, tmp_path_factory):
    s = Server(env, tmp_path_factory.mktemp("plain") / "log", "--max-images", "3", "--max-body-mb", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """media/in.png (allowed), outside.png, media/link.png -> outside.png."""
    root = tmp_path_factory.mktemp("files")
    (root / "media").mkdir()
    (root / "media" / "in.png").write_bytes(PNG)
    (root / "outside.png").write_bytes(PNG)
    (root / "media" / "link.png").symlink_to(root / "outside.png")
    return root


@pytest.fixture(scope="module")
def secure(env, media, tmp_path_factory):
    s = Server(env, tmp_path_factory.mktemp("secure") / "log", "--api-key", KEY, "--allow-private-urls",
               "--allowed-local-media-path", str(media / "media"), "--max-batch", "1", "--max-queue", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def png_origin():
    """http://127.0.0.1:PORT/img.png on a local HTTP server."""
    with png_server(PNG) as url:
        yield url + "/img.png"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, tiny())  # what the server's random default uses


# requests that must keep running: sampled, since a random model's greedy answer may be EOS at once, while
# sampling picks EOS with a chance of about 1/vocab per token
NO_EARLY_EOS = {"temperature": 1.0, "seed": 1}


def _model(server) -> str:
    return server.client(KEY).models.list().data[0].id


def _user(text, *urls):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            + [{"type": "text", "text": text}]}


def _post(server, payload, key=None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return httpx.post(server.url + "/v1/chat/completions", content=data, headers=headers, timeout=120, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert "Traceback" not in r.text
    return body["error"]


def _metrics(server, key=None) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    out = {}
    for line in httpx.get(server.url + "/metrics", headers=headers, timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait_idle(server, idle_pages, key=None, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(server, key)
        if m["pixtral_rt_kv_pages_used"] == idle_pages and m["pixtral_rt_requests_running"] == 0:
            return m
        assert time.monotonic() < deadline, f"KV pages not freed: {m}"
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------ answers
def test_models_health_and_metrics(plain):
    models = plain.client().models.list().data
    assert [m.id for m in models] == ["random-tiny-pixtral"]
    assert httpx.get(plain.url + "/health").json() == {"status": "ok"}
    m = _metrics(plain)
    for name in ("pixtral_rt_requests_running", "pixtral_rt_requests_waiting", "pixtral_rt_kv_pages_used",
                 "pixtral_rt_kv_pages_cached", "pixtral_rt_kv_pages_free", "pixtral_rt_preemptions_total",
                 "pixtral_rt_kv_pages_total", "pixtral_rt_prompt_tokens_total", "pixtral_rt_generation_tokens_total",
                 "pixtral_rt_time_to_first_token_seconds_count", "pixtral_rt_inter_token_latency_seconds_count"):
        assert name in m, name
    assert m["pixtral_rt_kv_pages_total"] > 0


def test_image_chat_and_usage_equal_the_tokenizer_count(plain, tokenizer):
    messages = [{"role": "system", "content": "You describe images."}, _user("What is this?", DATA_URL),
                {"role": "assistant", "content": "A picture."}, _user("Again, with [IMG] typed as text.")]
    r = plain.client().chat.completions.create(model=_model(plain), messages=messages, max_tokens=5, temperature=0)
    want = encode_request(messages, tokenizer, tiny(), max_tokens=5)
    assert want.n_images == 1
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == want.prompt_tokens + 5
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.id.startswith("chatcmpl-")


def test_streamed_text_equals_the_whole_answer(plain, tokenizer):
    client, model = plain.client(), _model(plain)
    messages = [_user("Describe the image in detail.", DATA_URL)]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == \
        encode_request(messages, tokenizer, tiny()).prompt_tokens


def test_logprobs_are_consistent_with_the_greedy_tokens(plain):
    r = plain.client().chat.completions.create(model=_model(plain), messages=[_user("Count to ten.")],
                                               max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == 8
    for it in items:
        assert len(it.top_logprobs) == 3
        assert it.top_logprobs[0].token == it.token and it.top_logprobs[0].logprob == pytest.approx(it.logprob)
        assert [t.logprob for t in it.top_logprobs] == sorted((t.logprob for t in it.top_logprobs), reverse=True)
        assert it.logprob <= 0 and bytes(it.bytes).decode("utf-8", "replace") == it.token
    assert b"".join(bytes(it.bytes) for it in items).decode("utf-8", "replace") == r.choices[0].message.content
    plain_r = plain.client().chat.completions.create(model=_model(plain), messages=[_user("Count to ten.")],
                                                     max_tokens=8, temperature=0)
    assert plain_r.choices[0].logprobs is None
    assert plain_r.choices[0].message.content == r.choices[0].message.content


def test_n_choices_follow_seed_plus_index(plain):
    client, model, msgs = plain.client(), _model(plain), [_user("Say something.")]
    kw = dict(model=model, messages=msgs, max_tokens=6, temperature=1.0)
    many = client.chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == 18
    for i in range(3):
        alone = client.chat.completions.create(n=1, seed=11 + i, **kw)
        assert alone.choices[0].message.content == many.choices[i].message.content
    assert len({c.message.content for c in many.choices}) > 1


def test_stop_strings_cut_the_answer(plain):
    client, model, msgs = plain.client(), _model(plain), [_user("Write a long sentence.")]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    want = text[:text.find(stop)]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_requests_equal_each_request_alone(plain):
    client, model = plain.client(), _model(plain)

    def ask(i: int) -> str:
        return client.chat.completions.create(model=model, messages=[_user(f"Request {i}: tell me about {i * 7}.")],
                                              max_tokens=6, temperature=0).choices[0].message.content

    alone = [ask(i) for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone


def test_32_streams_without_max_tokens_run_at_once_and_give_back_every_page(plain):
    """KV pages on demand (issue 20): with no max_tokens nothing is reserved for the answer (it was the rest
    of the 8192-token context each, so 4 of these ran at a time), so 32 streams decode together; once the
    clients leave, every page is back (held by no request: free, or cached prefix pages)."""
    import threading
    n, started, leave = 32, threading.Semaphore(0), threading.Event()
    errors = []

    def stream(i):
        body = {"messages": [_user(f"stream {i}: go on and on about the number {i * 13}")], "stream": True,
                **NO_EARLY_EOS}
        try:
            with httpx.stream("POST", plain.url + "/v1/chat/completions", json=body, timeout=120) as r:
                lines = r.iter_lines()           # kept: a dropped iterator closes the response (a disconnect)
                data = 0
                for line in lines:               # the role chunk, then a first token: it streams
                    data += line.startswith("data:")
                    if data == 2:
                        break
                started.release()
                leave.wait(120)                  # leaving the block disconnects, mid-answer
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
            started.release()

    ths = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    [t.start() for t in ths]
    try:
        for _ in range(n):
            assert started.acquire(timeout=120), "a stream did not start"
        assert not errors, errors
        peak, deadline = 0, time.monotonic() + 30
        while peak < n - 2 and time.monotonic() < deadline:
            peak = max(peak, _metrics(plain)["pixtral_rt_requests_running"])
            time.sleep(0.1)
        m = _metrics(plain)
        assert peak >= n - 2, f"at most {peak} of {n} streams ran at once: {m}"
        assert m["pixtral_rt_kv_pages_used"] > 0 and m["pixtral_rt_preemptions_total"] == 0
    finally:
        leave.set()
        [t.join(60) for t in ths]
    m = _wait_idle(plain, 0)
    assert m["pixtral_rt_kv_pages_cached"] + m["pixtral_rt_kv_pages_free"] == m["pixtral_rt_kv_pages_total"]


# ------------------------------------------------------------------------------------------ errors
BAD_BASE64 = "data:image/png;base64,!!!not-base64!!!"
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"<html>hello</html>").decode()


@pytest.mark.parametrize("payload,status,param,code", [
    ({"messages": [_user("hi", BAD_BASE64)]}, 400, "messages[0].content[0]", "invalid_image"),
    ({"messages": [_user("hi", NOT_AN_IMAGE)]}, 400, "messages[0].content[0]", "invalid_image"),
    ({"messages": [_user("hi", base64.b64encode(PNG).decode())]}, 400, "messages[0].content[0]", "invalid_image"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}]}, 400,
     "messages[0].content[1]", "invalid_value"),
    ({"messages": [_user("hi")], "temperature": 3}, 400, "temperature", "invalid_value"),
    ({"messages": [_user("hi")], "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"messages": [_user("hi")], "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"messages": [_user("hi")], "n": 0}, 400, "n", "invalid_value"),
    ({"messages": [_user("hi")], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value"),
    ({"messages": [_user("hi")], "top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "user"}]}, 400, "messages", "invalid_messages"),
    ({"messages": [_user("hi")], "max_tokens": 100000}, 400, "messages", "context_length_exceeded"),
    ({"messages": [_user("hi")], "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"messages": [_user("hi", *[DATA_URL] * 4)]}, 413, "messages", "too_many_images"),
    ({"messages": [_user("hi", "/etc/hostname")]}, 400, "messages[0].content[0]", "invalid_image"),
])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(plain, payload, status, param, code):
    err = _error(_post(plain, {"model": "random-tiny-pixtral", **payload}), status)
    assert err["param"] == param and err["code"] == code, err
    assert len(err["message"]) > 10
    assert httpx.get(plain.url + "/health").status_code == 200


# refused before any connection is tried, so nothing is resolved or contacted (example.invalid included)
MALFORMED_URLS = [("http://user:pass@127.0.0.1/", "contains credentials"), ("http://[::1", "invalid host"),
                  ("http://a b/x.png", "contains the character ' '"), ("http://127.0.0.1:abc/", "invalid port 'abc'"),
                  ("http://127.0.0.1:59449@example.invalid/", "contains credentials")]


def _local_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_malformed_image_urls_are_400_on_a_connection_that_stays_up(plain):
    with httpx.Client(base_url=plain.url, timeout=120) as client:
        ports = set()
        for url, part in MALFORMED_URLS:
            r = client.post("/v1/chat/completions", json={"messages": [_user("hi", url)], "max_tokens": 1})
            err = _error(r, 400)
            assert err["param"] == "messages[0].content[0]" and err["code"] == "invalid_image", err
            assert part in err["message"] and repr(url) in err["message"], err
            ports.add(_local_port(r))
        ok = client.post("/v1/chat/completions", json={"messages": [_user("hi", DATA_URL)], "max_tokens": 1})
        assert ok.status_code == 200, ok.text
        assert ports == {_local_port(ok)}  # one kept-alive connection served them all


@pytest.mark.parametrize("extra,param,code", [
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),   # tools: tests/test_structured_serve.py
    ({"min_p": 0.5}, "min_p", "unsupported_parameter"),
    ({"ignore_eos": True}, "ignore_eos", "unsupported_parameter"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"logit_bias": {"17": 500}}, "logit_bias", "invalid_value"),
    ({"logit_bias": {"131072": 5}}, "logit_bias", "invalid_request"),
    ({"stop_token_ids": [7, 131072]}, "stop_token_ids[1]", "invalid_request"),
    ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ({"min_tokens": 3}, "min_tokens", "invalid_value"),
    ({"frobnicate": True}, "frobnicate", "unknown_parameter"),
])
def test_parameters_the_server_does_not_honour_or_out_of_range_are_400(plain, extra, param, code):
    err = _error(_post(plain, {"messages": [_user("hi")], "max_tokens": 1, **extra}), 400)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    assert err["message"].startswith(f"{param}: ")


def test_the_openai_client_with_harmless_and_unsupported_parameters(plain):
    client, model = plain.client(), _model(plain)
    r = client.chat.completions.create(model=model, messages=[_user("hi")], max_tokens=2, temperature=0,
                                       presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u-1",
                                       metadata={"k": "v"}, store=False, tool_choice="none", tools=[],
                                       response_format={"type": "text"}, parallel_tool_calls=True,
                                       extra_body={"top_k": 5})
    assert r.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[_user("hi")], max_tokens=2, service_tier="flex")
    assert e.value.status_code == 400 and e.value.body["param"] == "service_tier"
    assert e.value.body["code"] == "unsupported_parameter"


def test_context_error_carries_the_token_counts(plain):
    err = _error(_post(plain, {"messages": [_user("hi")], "max_tokens": 100000}), 400)
    assert "100000" in err["message"] and "8192" in err["message"]


def test_malformed_json_oversized_body_and_unknown_route(plain):
    assert _error(_post(plain, b'{"messages": [}'), 400)["code"] == "invalid_json"
    assert _error(_post(plain, b'\xff\xfe'), 400)["code"] == "invalid_json"
    assert _error(_post(plain, b"[1, 2]"), 400)["code"] == "invalid_request"
    big = {"messages": [_user("x" * (2 << 20))]}
    assert _error(_post(plain, big), 413)["code"] == "request_too_large"
    assert _error(httpx.get(plain.url + "/v1/nothing"), 404)["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as e:
        plain.client().chat.completions.create(model="random-tiny-pixtral", messages=[_user("hi")], temperature=9)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"


def test_private_image_urls_are_refused_by_default(plain, secure, png_origin):
    err = _error(_post(plain, {"messages": [_user("hi", png_origin)], "max_tokens": 1}), 400)
    assert "loopback" in err["message"] and png_origin in err["message"]
    ok = _post(secure, {"messages": [_user("hi", png_origin)], "max_tokens": 1}, key=KEY)
    assert ok.status_code == 200, ok.text


def test_unreachable_image_url_is_502(secure):
    url = f"http://127.0.0.1:{_free_port()}/gone.png"  # nothing listens there
    err = _error(_post(secure, {"messages": [_user("hi", url)], "max_tokens": 1}, key=KEY), 502)
    assert err["code"] == "image_fetch_failed" and url in err["message"]


def test_local_files_only_inside_the_allowed_folder(secure, media):
    inside = media / "media" / "in.png"
    for src in (str(inside), f"file://{inside}"):
        r = _post(secure, {"messages": [_user("hi", src)], "max_tokens": 1}, key=KEY)
        assert r.status_code == 200, r.text
    for src in (str(media / "outside.png"), f"file://{media}/media/../outside.png", str(media / "media" / "link.png")):
        err = _error(_post(secure, {"messages": [_user("hi", src)], "max_tokens": 1}, key=KEY), 400)
        assert "outside the folder" in err["message"], err


def test_api_key(secure):
    payload = {"messages": [_user("hi")], "max_tokens": 1}
    for key in (None, "wrong"):
        r = _post(secure, payload, key=key)
        assert _error(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert _error(httpx.get(secure.url + "/v1/models"), 401)["code"] == "invalid_api_key"
    assert _error(httpx.get(secure.url + "/metrics"), 401)["code"] == "invalid_api_key"
    assert httpx.get(secure.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        secure.client("wrong").models.list()
    r = secure.client(KEY).chat.completions.create(model=_model(secure), messages=[_user("hi")], max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_full_queue_is_503(secure):
    # --max-batch 1 --max-queue 1: one request runs, one waits, the next is refused
    long = {"messages": [_user("long answer")], "max_tokens": 400, "stream": True, **NO_EARLY_EOS}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", secure.url + "/v1/chat/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
            next(lines)
            with c.stream("POST", secure.url + "/v1/chat/completions", json=long) as waiting:
                deadline = time.monotonic() + 20
                while _metrics(secure, KEY)["pixtral_rt_requests_waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                assert waiting.status_code == 200
                err = _error(_post(secure, {"messages": [_user("hi")], "max_tokens": 1}, key=KEY), 503)
                assert err["code"] == "queue_full" and err["type"] == "server_error"
    _wait_idle(secure, 0, KEY)


# ------------------------------------------------------------------------------------------ lifecycle
def test_a_client_that_leaves_frees_its_kv_pages(plain):
    idle = _wait_idle(plain, _metrics(plain)["pixtral_rt_kv_pages_used"])["pixtral_rt_kv_pages_used"]
    long = {"messages": [_user("a very long answer please")], "max_tokens": 2000, **NO_EARLY_EOS}
    with httpx.stream("POST", plain.url + "/v1/chat/completions", json={**long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()  # kept: a dropped iterator would close the response already
        for _ in range(7):
            next(lines)
        deadline = time.monotonic() + 20
        while _metrics(plain)["pixtral_rt_kv_pages_used"] <= idle:  # the test sees pages in use
            assert time.monotonic() < deadline, "no KV pages in use while a request runs"
            time.sleep(0.1)
    # leaving the block closed the connection mid-stream
    _wait_idle(plain, idle)
    # a whole-answer request whose client gives up (read timeout) is cancelled as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(plain.url + "/v1/chat/completions", json=long, timeout=httpx.Timeout(60, read=1.5))
    _wait_idle(plain, idle)


def test_sigterm_ends_streams_and_exits_0(env, tmp_path):
    s = Server(env, tmp_path / "log")
    body = {"messages": [_user("go on forever")], "max_tokens": 2000, "stream": True, **NO_EARLY_EOS}
    lines = []
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        while len([x for x in lines if x.startswith("data:")]) < 3:
            lines.append(next(it))
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        lines += list(it)  # the stream ends instead of running to 2000 tokens
    data = [x for x in lines if x.startswith("data:")]
    assert data[-1] == "data: [DONE]" and '"shutting_down"' in data[-2]
    assert s.proc.wait(15) == 0, s.log()
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("include_usage", [False, True])
def test_fast_text_chunk_is_the_protocol_chunk(include_usage):
    """The hand-built SSE chunk of the streaming hot path parses to exactly what the pydantic model gives."""
    import asyncio
    import json as _json
    from types import SimpleNamespace

    from pixtral_rt.server.protocol import ChatCompletionChunk, ChunkChoice, DeltaMessage
    from pixtral_rt.server.app import _stream_events

    texts = ["plain", 'quote " and \\ backslash', "new\nline\ttab", "é ü 漢字 🙂", "\x01ctl", ""]

    class Run:
        choices = [object()]

        async def deltas(self):
            for t in texts:
                yield SimpleNamespace(index=0, text=t, logprobs=None, finish_reason=None, tool_calls=None)

        def usage(self):
            return None

    async def collect():
        return [x async for x in _stream_events(Run(), SimpleNamespace(include_usage=include_usage), "chatcmpl-t",
                                                 7, "m/\u00e9")]
    out = asyncio.run(collect())
    got = [_json.loads(x[len("data: "):]) for x in out[1:1 + len(texts) - 1]]
    exclude = None if include_usage else {"usage"}
    want = [_json.loads(ChatCompletionChunk(id="chatcmpl-t", created=7, model="m/\u00e9", choices=[
        ChunkChoice(index=0, delta=DeltaMessage(content=t))]).model_dump_json(exclude=exclude)) for t in texts[:-1]]
    assert got == want


def test_queued_events_coalesce_in_order():
    """Events already queued for a choice are merged into one delta (a behind consumer catches up in one
    chunk); text, token counts, logprobs and finish reasons stay exactly as sent, in order, per choice."""
    import asyncio
    from types import SimpleNamespace

    from pixtral_rt.server.completion import CompletionRun, TokenText
    from pixtral_rt.serving.outputs import TokenEvent
    tok = load_tokenizer(None, tiny())
    ids = tok.instruct_tokenizer.tokenizer.encode("Hello there, general Kenobi! How are you today?", bos=False,
                                                  eos=False)
    hist = SimpleNamespace(observe=lambda v: None)

    async def run():
        eng = SimpleNamespace(tokenizer=tok, submit=lambda *a, **k: SimpleNamespace(cancel=lambda: None))
        r = CompletionRun(eng, TokenText(tok), SimpleNamespace(ttft=hist, itl=hist), n=2, stop=(), logprobs=1,
                          arrived=0.0)
        r.submit(SimpleNamespace(prompt_tokens=3), [None, None])
        last = {0: len(ids) - 1, 1: max(i for i in range(len(ids)) if i % 3 == 0)}
        for i, t in enumerate(ids):                # interleave the two choices in bursts, all queued at once
            for ch in ((0,) if i % 3 else (0, 1)):
                r._queue.put_nowait((ch, TokenEvent(token_ids=[t], logprobs=[-0.5 - i], top_logprobs=[[(t, -0.5 - i)]],
                                                    finish_reason="length" if i == last[ch] else None)))
        out = [d async for d in r.deltas()]
        r.close()
        return out

    out = asyncio.run(run())
    assert len(out) < 2 * len(ids)                 # merged
    for ch, n in ((0, len(ids)), (1, len([i for i in range(len(ids)) if i % 3 == 0]))):
        ds = [d for d in out if d.index == ch]
        lps = [x.logprob for d in ds for x in (d.logprobs or [])]
        assert lps == [-0.5 - i for i in range(len(ids)) if ch == 0 or i % 3 == 0]
        assert [d.finish_reason for d in ds][-1] == "length" and all(d.finish_reason is None for d in ds[:-1])
        want = tok.decode([t for i, t in enumerate(ids) if ch == 0 or i % 3 == 0])
        assert "".join(d.text for d in ds) == want and len(lps) == n


def test_text_routes_and_sampling_controls_through_the_engine_process(plain):
    """/v1/completions, /tokenize and the sampling controls with the engine in its own process (EngineClient),
    as the server runs by default (tests/test_text_endpoints.py covers them in depth, in process)."""
    client, model = plain.client(), _model(plain)
    r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=0,
                                  logit_bias={"1000": 100}, extra_body={"min_tokens": 2})
    assert r.object == "text_completion" and r.usage.completion_tokens == 4
    assert len(set(r.choices[0].logprobs.tokens)) == 1               # the biased token, 4 times
    messages = [_user("What is this?", DATA_URL)]
    count = httpx.post(plain.url + "/tokenize", json={"model": model, "messages": messages}).json()["count"]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert count == chat.usage.prompt_tokens
    ids = httpx.post(plain.url + "/tokenize", json={"prompt": "round trip"}).json()["tokens"]
    assert httpx.post(plain.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": "round trip"}
