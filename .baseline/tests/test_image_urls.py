"""http(s) image URLs: every malformed one is refused up front (ImageSourceError, 400) naming the part that is
wrong, every accepted one is sent in a form urllib / http.client take (IDNA host, percent-encoded path), and
whatever a URL or the answer to it looks like, fetching ends in an image or a client-facing input error,
never in another exception (which the server would answer with 500).

No test here reaches the network: `fake_net` stands in for the connection (the address check's
`_connect_public`), connecting to a local socket on 127.0.0.1 that answers a canned reply, and name
resolution or any other connection fails the test.
"""
from __future__ import annotations

import io
import random
import socket

import numpy as np
import pytest
from PIL import Image

from pixtral_rt import images
from pixtral_rt.errors import ImageFetchError, ImageSourceError, PixtralInputError
from pixtral_rt.images import ImageLimits, checked_http_url, fetch_url, open_image

_b = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(_b, "PNG")
PNG = _b.getvalue()

SERVER_LIMITS = ImageLimits(allow_local_files=False, allow_private_urls=False)  # what the server uses


def _reply(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


PNG_REPLY = _reply("200 OK", PNG, "Content-Type: image/png")


class FakeNet:
    """The network, faked: `connect` (in place of images._connect_public) records the (host, port) asked for
    and returns a real TCP connection to a listener on 127.0.0.1 whose accepted end has already sent
    `answer(host, port)` (bytes) and shut its writing side. Nothing else may resolve or connect."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.asked: list[tuple[str, int]] = []
        self.answer = lambda host, port: PNG_REPLY
        self._peers: list[socket.socket] = []

    def connect(self, address, timeout, source_address=None):
        self.asked.append(address)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # a numeric address: no name lookup
        client.settimeout(timeout)
        client.connect(self.listener.getsockname())
        peer, _ = self.listener.accept()
        peer.sendall(self.answer(*address))
        peer.shutdown(socket.SHUT_WR)
        self._peers.append(peer)  # closed after the fetch: closing with the request unread would reset it
        return client

    def close_peers(self) -> None:
        for p in self._peers:
            p.close()
        self._peers.clear()

    def close(self) -> None:
        self.close_peers()
        self.listener.close()


def _no_network(*args, **kwargs):
    raise AssertionError(f"a test tried to use the network: {args}")


@pytest.fixture
def fake_net(monkeypatch):
    net = FakeNet()
    monkeypatch.setattr(images, "_connect_public", net.connect)
    monkeypatch.setattr(images, "_resolve", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    yield net
    net.close()


# ------------------------------------------------------------------------------------------ refused up front
@pytest.mark.parametrize("url,part", [
    ("http://user:pass@127.0.0.1/", "contains credentials"),
    ("http://user@example.com/x.png", "contains credentials"),
    ("http://127.0.0.1:59449@example.invalid/", "contains credentials"),
    ("http://[::1", "invalid host"),
    ("http://::1]/", "invalid host"),
    ("http://[::1]x/", "invalid IPv6 host"),
    ("http://[not-v6]/", "IPv6 address"),
    ("http://[fe80::1%25eth0]/", "invalid IPv6 address"),
    ("http://a b/x.png", "contains the character ' ' (U+0020) at position 8"),
    ("http://example.com/a b.png", "contains the character ' '"),
    ("http://exa\tmple.com/", "contains the character '\\t'"),
    ("http://example.com/\x00.png", "contains the character '\\x00'"),
    ("http://example.com/\ud800.png", "U+D800"),
    ("http://127.0.0.1:abc/", "invalid port 'abc'"),
    ("http://127.0.0.1:0/", "invalid port '0'"),
    ("http://127.0.0.1:65536/", "invalid port '65536'"),
    ("http://127.0.0.1:\u0663/", "invalid port"),
    ("http://127.0.0.1:1:2/", "invalid host"),
    ("http:///x.png", "has no host"),
    ("http://:8080/x.png", "has no host"),
    ("http:x.png", "has no host"),
    ("http://a..b/x.png", "not a valid domain name"),
    ("http://" + "a" * 64 + ".example/", "not a valid domain name"),
    ("http://exa!mple.com/", "not a valid domain name"),
    ("http://exa%6Dple.com/", "percent-encoded host"),
    ("http://\uff41\uff0f\uff42/", "invalid host"),   # fullwidth 'a/b': its NFKC form holds a '/'
])
def test_malformed_urls_are_refused_naming_the_part(url, part, fake_net):
    with pytest.raises(ImageSourceError) as e:
        open_image(url, SERVER_LIMITS)
    assert part in str(e.value) and e.value.status == 400, str(e.value)
    assert str(e.value).startswith("image URL " + images.describe_source(url))
    assert fake_net.asked == []   # refused before any connection


def test_the_port_message_is_the_one_users_see(fake_net):
    with pytest.raises(ImageSourceError) as e:
        fetch_url("http://127.0.0.1:abc/", SERVER_LIMITS)
    assert str(e.value).startswith("image URL 'http://127.0.0.1:abc/' has an invalid port 'abc'")


# ------------------------------------------------------------------------------------------ accepted and sent
SENT = [  # URL -> (host, port) connected to, request line sent (None: https, which the fake cannot answer)
    ("http://example.com/x.png", "example.com", 80, "GET /x.png HTTP/1.1"),
    ("HTTPS://Example.COM:0443/a?b=1#frag", "example.com", 443, None),
    ("http://example.com:/x.png", "example.com", 80, "GET /x.png HTTP/1.1"),     # an empty port is the default
    ("http://b\u00fccher.example/caf\u00e9.png?q=\u00fc", "xn--bcher-kva.example", 80,
     "GET /caf%C3%A9.png?q=%C3%BC HTTP/1.1"),
    ("http://[2001:db8::1]:8080/p%20q.png", "2001:db8::1", 8080, "GET /p%20q.png HTTP/1.1"),
    ("http://example.com", "example.com", 80, "GET / HTTP/1.1"),
]


def test_accepted_urls_are_sent_ascii(fake_net, monkeypatch):
    # one test over all cases: the plain ones guard against the check refusing what worked before
    sent = []
    real_send = images.http.client.HTTPConnection.send
    monkeypatch.setattr(images.http.client.HTTPConnection, "send", lambda self, data: (sent.append(data),
                                                                                        real_send(self, data)))
    for url, host, port, request_line in SENT:
        sent.clear()
        fake_net.asked.clear()
        try:
            data = fetch_url(url, SERVER_LIMITS)
        except ImageFetchError:  # https: the fake listener does not speak TLS
            assert request_line is None, url
        else:
            assert data == PNG, url
        finally:
            fake_net.close_peers()
        assert fake_net.asked == [(host, port)], url
        if request_line:
            assert b"".join(sent).decode("ascii").startswith(request_line + "\r\n"), url


def test_checked_url_is_idempotent():
    for url in ("http://b\u00fccher.example/caf\u00e9.png", "http://[2001:DB8::1]:8080/", "http://E.com:/a?b"):
        once = checked_http_url(url)
        assert checked_http_url(once) == once and once.isascii()


# ------------------------------------------------------------------------------------------ redirects
@pytest.mark.parametrize("location,part", [
    ("http://user:pw@example.com/x.png", "contains credentials"),
    ("http://[::1/x.png", "malformed URL"),
    ("http://example.com:abc/x.png", "invalid port 'abc'"),
    ("http://exa!mple.com/x.png", "not a valid domain name"),
    ("ftp://example.com/x.png", "non-http(s) URL (scheme 'ftp')"),
])
def test_a_bad_redirect_target_is_an_upstream_error(location, part, fake_net):
    fake_net.answer = lambda host, port: (_reply("302 Found", b"", f"Location: {location}") if host == "example.com"
                                          and port == 80 else PNG_REPLY)
    with pytest.raises(ImageFetchError) as e:
        fetch_url("http://example.com/start.png", SERVER_LIMITS)
    assert part in str(e.value) and e.value.status == 502 and "'http://example.com/start.png'" in str(e.value)


def test_a_good_redirect_target_is_fetched_in_its_checked_form(fake_net):
    fake_net.answer = lambda host, port: (_reply("302 Found", b"", "Location: http://B\u00fccher.example:8080/i.png")
                                          if host == "example.com" else PNG_REPLY)
    # a non-ASCII host in Location (not a valid URI: it should be in its xn-- form) reaches urllib as latin-1
    # text, which it percent-encodes: the host is then refused, never sent as it came
    with pytest.raises(ImageFetchError, match="percent-encoded host|not a valid domain name"):
        fetch_url("http://example.com/a.png", SERVER_LIMITS)
    fake_net.answer = lambda host, port: (_reply("302 Found", b"", "Location: http://Other.Example:8080/i.png")
                                          if host == "example.com" else PNG_REPLY)
    assert fetch_url("http://example.com/a.png", SERVER_LIMITS) == PNG
    assert fake_net.asked[-1] == ("other.example", 8080)


# ------------------------------------------------------------------------------------------ answers
ANSWERS = [  # what the remote server sends -> what the error says
    (b"SSH-2.0-OpenSSH_9.6\r\n", "not valid HTTP"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n", "not valid HTTP"),
    (b"", "connection error"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "not a recognised image format"),
    (_reply("404 Not Found"), "HTTP 404"),
]


def test_an_answer_that_is_not_an_image_is_a_clean_error(fake_net):
    # one test over all answers: the last three were handled before and must stay so
    for answer, kind in ANSWERS:
        fake_net.answer = lambda host, port: answer
        with pytest.raises(PixtralInputError, match=kind) as e:
            open_image("http://example.com/x.png", SERVER_LIMITS)
        fake_net.close_peers()
        assert e.value.status in (400, 502), answer[:40]


def test_absurd_content_length_is_not_a_malformed_url(fake_net):
    fake_net.answer = lambda host, port: (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n"
                                          b"Connection: close\r\n\r\n" + PNG)
    assert open_image("http://example.com/x.png", SERVER_LIMITS).size == (6, 5)


# ------------------------------------------------------------------------------------------ fuzz
ODD = list("[]@:%/?#&=+;,!$'()*\\|^`{}<>\".-_~") + [" ", "\t", "\n", "\r", "\x00", "\x7f", "\x1b"] + [
    "\u00e9", "\u00fc", "\u6f22", "\u00df", "\u200b", "\u00ad", "\ufeff", "\ud800", "\uff0f", "\uff0e", "\u3002",
    "\U0001f642", "\u0663", "\u00b2", "\u0130", "\u2028", "\uff20", "\uff1a"]
PLAIN = list("abcxyzABCXYZ0123456789")
HOSTS = ["example.com", "127.0.0.1", "[::1]", "[2001:db8::1]", "b\u00fccher.example", "a_b.example", "localhost",
         "EXAMPLE.COM.", "xn--bcher-kva.example", "10.0.0.1", "[::ffff:127.0.0.1]", "example.invalid", "1.2.3"]
KNOWN_BAD = ["http://user:pass@127.0.0.1/", "http://[::1", "http://a b/x.png", "http://127.0.0.1:abc/",
             "http://127.0.0.1:59449@example.invalid/"]


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ODD if rng.random() < 0.3 else PLAIN) for _ in range(n))


def _part(rng: random.Random, usual: list[str], absent_p: float, odd_p: float = 0.4) -> str | None:
    """Absent (None) with chance absent_p; else odd (empty, random or very long) with chance odd_p, or usual."""
    if rng.random() < absent_p:
        return None
    if rng.random() >= odd_p:
        return rng.choice(usual)
    return rng.choice(["", _text(rng, rng.randint(1, 12)), _text(rng, rng.choice([64, 300, 3000]))])


def _url(rng: random.Random) -> str:
    """One URL built part by part (each usual, absent, empty, random or very long), sometimes mutated."""
    scheme = _part(rng, ["http", "https", "HTTP", "hTtP"], 0.0, odd_p=0.05)
    user = _part(rng, ["user:pass", "u", "127.0.0.1:59449", ""], 0.85)
    host = _part(rng, HOSTS, 0.0, odd_p=0.3)
    port = _part(rng, ["80", "8080", "65535", "0", "65536", "099", "99999999999999999999"], 0.6)
    path = _part(rng, ["/x.png", "/a/b/c.png", "/", "/caf\u00e9.png", "/%41%zz"], 0.1)
    query = _part(rng, ["a=1", "q=\u00fc&b", ""], 0.7)
    fragment = _part(rng, ["top", ""], 0.85)
    url = (f"{scheme}://" + (f"{user}@" if user is not None else "") + host + (f":{port}" if port is not None else "")
           + (path or "") + (f"?{query}" if query is not None else "") + (f"#{fragment}" if fragment is not None
                                                                            else ""))
    for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):  # point mutations anywhere
        i = rng.randrange(len(url) + 1)
        op = rng.random()
        char = rng.choice(ODD + PLAIN)
        url = url[:i] + char + url[i:] if op < 0.5 else url[:i] + char + url[i + 1:] if op < 0.8 else \
            url[:i] + url[i + 1:]
    return url


def _answer(rng: random.Random, urls: list[str]):
    """What the fake remote server says: mostly the PNG, sometimes a redirect to another fuzzed URL (its
    UTF-8 bytes, as a server would send them), an error status, HTML, or bytes that are not HTTP."""
    def answer(host, port) -> bytes:
        r = rng.random()
        if r < 0.55:
            return PNG_REPLY
        if r < 0.75:
            target = rng.choice(urls).replace("\r", "").replace("\n", "").encode("utf-8", "replace")
            return b"HTTP/1.1 302 Found\r\nLocation: " + target + b"\r\nContent-Length: 0\r\n\r\n"
        return rng.choice([_reply("404 Not Found"), _reply("200 OK", b"<html>no</html>"), b"SSH-2.0-x\r\n", b"",
                           b"HTTP/1.1 200 OK\r\nContent-Length: " + "\u00b2".encode() + b"\r\n\r\n" + PNG])
    return answer


def test_fuzzed_urls_end_in_an_image_or_a_client_facing_error(fake_net):
    from pixtral_rt.serve_app import _input_error
    rng = random.Random(19)
    urls = KNOWN_BAD + [_url(rng) for _ in range(3000)]
    fake_net.answer = _answer(rng, urls)
    outcomes: dict[str, int] = {}
    for url in urls:
        try:
            open_image(url, SERVER_LIMITS)
            kind = "image"
        except PixtralInputError as exc:
            status = _input_error(exc).status
            assert 400 <= status < 500 or status == 502, (url, status, exc)
            kind = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - the failure this test exists to find
            raise AssertionError(f"{url!r} raised {type(exc).__name__}: {exc}") from exc
        finally:
            fake_net.close_peers()
        outcomes[kind] = outcomes.get(kind, 0) + 1
    # the fuzz reached every stage: images fetched, URLs refused up front, fetches that failed upstream
    assert outcomes.get("image", 0) > 100 and outcomes["ImageSourceError"] > 100 and outcomes["ImageFetchError"] > 50, \
        outcomes
    # only checked hosts were ever connected to: ASCII names or IPv6 addresses, never a raw string
    for host, port in fake_net.asked:
        assert host.isascii() and 1 <= port <= 65535 and (images._HOST_NAME.fullmatch(host) or ":" in host), host
