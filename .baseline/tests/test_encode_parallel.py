"""A request's images are opened (fetched) and decoded + preprocessed on threads (chat.encode_request):
the same tokens and the same pixels as one by one, for every kind of source at once (file, PNG / JPEG bytes,
numpy, data URL, http URL), with and without raw pixels; the first failing image in request order is the one
named in the error, as in the serial loop."""
import base64
import contextlib
import io

import numpy as np
import pytest
from PIL import Image

from pixtral_rt.chat import encode_request, load_tokenizer
from pixtral_rt.config import PIXTRAL_12B
from pixtral_rt.errors import ImageError
from tests.helpers import png_server


def _encoded(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, PIXTRAL_12B)


def _sources(tmp_path, url):
    rng = np.random.default_rng(0)
    arrs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in
            [(300, 500), (37, 1500), (640, 480), (1024, 1024), (17, 17), (211, 97)]]
    path = tmp_path / "a.jpg"
    path.write_bytes(_encoded(arrs[0], "JPEG"))
    data_url = "data:image/png;base64," + base64.b64encode(_encoded(arrs[3], "PNG")).decode()
    return [str(path), _encoded(arrs[1], "PNG"), arrs[2], data_url, url, _encoded(arrs[5], "JPEG")]


def _msgs(sources):
    return [{"role": "user", "content": [{"type": "image", "image": s} for s in sources]
             + [{"type": "text", "text": "Compare them."}]}]


@pytest.mark.parametrize("raw", [False, True])
def test_threads_give_the_serial_tokens_and_pixels(tmp_path, tok, raw):
    png = _encoded(np.random.default_rng(9).integers(0, 256, (90, 130, 3), dtype=np.uint8), "PNG")
    with png_server(png) as base:
        srcs = _sources(tmp_path, base + "/x.png")
        for k in (1, 2, 6):
            a = encode_request(_msgs(srcs[:k]), tok, PIXTRAL_12B, raw_pixels=raw, workers=1)
            b = encode_request(_msgs(srcs[:k]), tok, PIXTRAL_12B, raw_pixels=raw, workers=0)   # threads forced
            assert a.tokens == b.tokens and a.patch_grids == b.patch_grids and a.cu_seqlens == b.cu_seqlens
            assert len(a.images) == len(b.images) == k
            for x, y in zip(a.images, b.images):
                x, y = np.asarray(x), np.asarray(y)
                assert x.shape == y.shape and np.array_equal(x, y)


def test_first_failing_image_in_order_is_named(tmp_path, tok):
    good = _encoded(np.zeros((20, 20, 3), np.uint8) + 7, "PNG")
    bad1, bad2 = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, str(tmp_path / "missing.png")
    for workers in (1, 0):
        with pytest.raises(ImageError) as e:
            encode_request(_msgs([good, bad1, bad2]), tok, PIXTRAL_12B, workers=workers)
        assert str(e.value).startswith("messages[0].content[1]: "), str(e.value)     # not content[2]


def _counting_decode(monkeypatch):
    """Patch OpenedImage.decode to count calls and signal the first; patch chat._tokenize to wait (briefly)
    for that signal and record whether decoding had started while it tokenised."""
    import threading

    from pixtral_rt import chat, images
    started = threading.Event()
    seen = {"decodes": 0, "during_tokenize": None}
    real_decode, real_tokenize = images.OpenedImage.decode, chat._tokenize

    def decode(self):
        seen["decodes"] += 1
        started.set()
        return real_decode(self)

    def tokenize(*a, **k):
        seen["during_tokenize"] = started.wait(timeout=2.0)
        return real_tokenize(*a, **k)
    monkeypatch.setattr(images.OpenedImage, "decode", decode)
    monkeypatch.setattr(chat, "_tokenize", tokenize)
    return seen, started


def test_decoding_overlaps_tokenising_only_when_no_count_can_refuse(tok, monkeypatch):
    from pixtral_rt.errors import ContextLengthError
    jpg = _encoded(np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8), "JPEG")
    msgs = _msgs([jpg])
    serial = encode_request(msgs, tok, PIXTRAL_12B, raw_pixels=True, workers=1)
    n = serial.prompt_tokens
    seen, started = _counting_decode(monkeypatch)
    # fits with room to spare: decoding runs beside tokenisation, same tokens and pixels
    got = encode_request(msgs, tok, PIXTRAL_12B, raw_pixels=True, max_context=4096)
    assert seen == {"decodes": 1, "during_tokenize": True}
    assert got.tokens == serial.tokens and np.array_equal(got.images[0], serial.images[0])
    # fits exactly, but not at the text bound: decoding waits for the exact check, then runs
    seen.update(decodes=0, during_tokenize=None)
    started.clear()
    got = encode_request(msgs, tok, PIXTRAL_12B, raw_pixels=True, max_context=n + 5, max_tokens=5)
    assert seen == {"decodes": 1, "during_tokenize": False}
    assert got.tokens == serial.tokens and np.array_equal(got.images[0], serial.images[0])
    # refused on the context: nothing decoded
    seen.update(decodes=0, during_tokenize=None)
    started.clear()
    with pytest.raises(ContextLengthError):
        encode_request(msgs, tok, PIXTRAL_12B, raw_pixels=True, max_context=n + 4, max_tokens=5)
    assert seen["decodes"] == 0


def test_digests_run_with_the_decoding(tok):
    from pixtral_rt.serving.sequence import image_digest
    rng = np.random.default_rng(2)
    srcs = [_encoded(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "PNG") for h, w in [(64, 48), (30, 90)]]
    for raw in (True, False):
        req = encode_request(_msgs(srcs), tok, PIXTRAL_12B, raw_pixels=raw, digest=image_digest)
        assert req.image_digests == [image_digest(im) for im in req.images]
        assert len(set(req.image_digests)) == 2
