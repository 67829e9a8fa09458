"""The HTTP app in-process: uvicorn in a thread on 127.0.0.1, over a fake engine whose request path raises
(a server bug), called with httpx on one kept-alive connection. Fast: no model is loaded."""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("uvicorn", reason="the server needs the serve extra (pip install -e '.[serve]'), which "
                                      "the test extra includes")
import uvicorn  # noqa: E402

from pixtral_rt.chat import load_tokenizer  # noqa: E402
from pixtral_rt.config import tiny  # noqa: E402
from pixtral_rt.serve_app import build_app  # noqa: E402


class BuggyEngine:
    """Enough of an engine for build_app; encode() fails the way a bug in the request path would."""

    ready = True
    max_context = 8192
    info = {"model": "fake", "device": "cpu"}

    def __init__(self):
        self.tokenizer = load_tokenizer(None, tiny())

    def encode(self, *args, **kwargs):
        raise RuntimeError("boom: a bug in the request path")

    def metrics(self) -> dict:
        return dict.fromkeys(("running", "waiting", "kv_pages_used", "kv_pages_total", "prompt_tokens_total",
                              "generation_tokens_total", "cached_prompt_tokens_total", "requests_finished_total"), 0)


@contextlib.contextmanager
def live(app):
    """`app` served by uvicorn in a thread on 127.0.0.1 (no signal handlers off the main thread)."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def _local_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_a_server_bug_answers_500_is_logged_and_keeps_the_connection(caplog):
    caplog.set_level(logging.ERROR, logger="pixtral_rt.serve")
    with live(build_app(BuggyEngine(), "fake")) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500, r.text
        assert r.json() == {"error": {"message": "internal server error (the server log has the details)",
                                      "type": "server_error", "param": None, "code": "internal_error"}}
        assert "boom" not in r.text and r.headers.get("connection") != "close"
        after = client.get("/v1/models")  # the same kept-alive connection answers the next request
        assert after.status_code == 200 and after.json()["data"][0]["id"] == "fake"
        assert _local_port(after) == _local_port(r)
    logged = [rec for rec in caplog.records if rec.exc_info and "boom" in str(rec.exc_info[1])]
    assert logged and "/v1/chat/completions" in logged[0].getMessage()
