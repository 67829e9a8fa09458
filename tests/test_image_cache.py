"""pixtral_rt/image_cache.py: a repeated image (same data URL or bytes) is neither base64-decoded, nor
decoded to pixels, nor hashed again; every hit re-checks the request's limits; shared pixels are read-only."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from pixtral_rt import image_cache, images
from pixtral_rt.errors import AnimatedImageError, ImageTooLargeError
from pixtral_rt.images import ImageLimits, load_image, open_image


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(image_cache, "CACHE", image_cache.DecodedImageCache(64 << 20))
    yield


def _png(h=37, w=53, seed=0, exif_orientation=None) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    b = io.BytesIO()
    im = Image.fromarray(a)
    if exif_orientation is not None:
        ex = Image.Exif()
        ex[0x0112] = exif_orientation
        im.save(b, "JPEG", exif=ex.tobytes(), quality=95)
    else:
        im.save(b, "PNG")
    return b.getvalue()


def _url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def test_repeated_data_url_skips_base64_and_decode(monkeypatch):
    url = _url(_png())
    first = load_image(url)
    calls = {"b64": 0, "open": 0}
    real_b64, real_open = base64.b64decode, Image.open

    def b64(*a, **k):
        calls["b64"] += 1
        return real_b64(*a, **k)

    def pil_open(*a, **k):
        calls["open"] += 1
        return real_open(*a, **k)

    monkeypatch.setattr(images.base64, "b64decode", b64)
    monkeypatch.setattr(images.Image, "open", pil_open)
    again = open_image(url)
    assert again.cached is not None and again.size == (53, 37)
    np.testing.assert_array_equal(again.decode(), first)
    assert calls == {"b64": 0, "open": 0}
    other = load_image(_url(_png(seed=1)))                       # another image: decoded, not confused
    assert calls == {"b64": 1, "open": 1} and not np.array_equal(other, first)
    assert image_cache.CACHE.hits == 1


def test_repeated_bytes_skip_decode_and_pixels_are_read_only():
    data = _png(seed=3)
    a = load_image(data)
    b = open_image(data)
    assert b.cached is not None
    px = b.decode()
    np.testing.assert_array_equal(px, a)
    with pytest.raises(ValueError):
        px[0, 0, 0] = 1                                           # shared by every request that sends it


def test_every_hit_checks_this_requests_limits():
    url = _url(_png(h=40, w=50))
    load_image(url)
    with pytest.raises(ImageTooLargeError, match="40 = 2000 pixels, over the cap of 1999"):
        open_image(url, ImageLimits(max_pixels=1999))
    with pytest.raises(ImageTooLargeError, match="bytes, over the cap of 10"):
        open_image(_png(h=40, w=50), ImageLimits(max_bytes=10))
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)).convert("P") for v in (10, 200, 90)]
    g = io.BytesIO()
    frames[0].save(g, "GIF", save_all=True, append_images=frames[1:], duration=50)
    with pytest.warns(images.AnimatedImageWarning, match="with 3 frames: using the first frame only"):
        load_image(g.getvalue())
    with pytest.raises(AnimatedImageError, match="animated GIF with 3 frames; only still images"):
        open_image(g.getvalue(), ImageLimits(allow_animated=False))


def test_exif_setting_is_part_of_the_key():
    data = _png(h=20, w=30, exif_orientation=6)                  # rotated 90 degrees by EXIF
    upright = load_image(data)
    raw = load_image(data, ImageLimits(apply_exif_orientation=False))
    assert upright.shape == (30, 20, 3) and raw.shape == (20, 30, 3)
    assert load_image(data).shape == (30, 20, 3)


def test_pixel_digest_is_computed_once_per_image():
    from pixtral_rt.chat import encode_request, load_tokenizer
    from pixtral_rt.config import tiny
    from pixtral_rt.serving.sequence import image_digest
    args = tiny()
    tok = load_tokenizer(None, args)
    n = {"calls": 0}

    def digest(x):
        n["calls"] += 1
        return image_digest(x)

    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(_png(seed=9))}},
                                         {"type": "text", "text": "what is it?"}]}]
    r1 = encode_request(msgs, tok, args, raw_pixels=True, digest=digest, workers=1)
    r2 = encode_request(msgs, tok, args, raw_pixels=True, digest=digest, workers=1)
    assert n["calls"] == 1
    assert r1.image_digests == r2.image_digests == [image_digest(r1.images[0])]
    np.testing.assert_array_equal(r1.images[0], r2.images[0])


def test_lru_keeps_the_newest_within_its_bytes_and_off_caches_nothing(monkeypatch):
    one = np.zeros((10, 10, 3), np.uint8).nbytes
    cache = image_cache.DecodedImageCache(2 * one)
    monkeypatch.setattr(image_cache, "CACHE", cache)
    blobs = [_png(10, 10, seed=s) for s in range(3)]
    for b in blobs:
        load_image(b)
    keys = [image_cache.encoded_key(b, True) for b in blobs]
    assert cache.get(keys[0]) is None and cache.get(keys[1]) is not None and cache.get(keys[2]) is not None
    assert cache.bytes == 2 * one
    off = image_cache.DecodedImageCache(0)
    monkeypatch.setattr(image_cache, "CACHE", off)
    load_image(blobs[0])
    assert open_image(blobs[0]).cached is None and off.bytes == 0 and off.get(keys[0]) is None
