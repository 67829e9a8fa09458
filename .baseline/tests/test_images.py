"""Image loading: every source kind, format and pixel mode, EXIF orientations 1-8, and every bad input
(a specific exception type whose message names the input). URL tests use a local HTTP server on
127.0.0.1 that serves a few fixed routes and stops at the end of the module; its slow route sleeps at most
3 s, and the client's timeout is 0.5 s."""
from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from pixtral_rt.errors import (AnimatedImageError, AnimatedImageWarning, ImageDecodeError, ImageError, ImageFetchError,
                               ImageSourceError, ImageTooLargeError, PixtralInputError)
from pixtral_rt.images import ImageLimits, fetch_url, load_image, open_image


def _mc_rgb(im: Image.Image) -> np.ndarray:
    """mistral_common's own RGB conversion (alpha onto white), the reference for modes."""
    from mistral_common.tokens.tokenizers.image import _convert_to_rgb
    return np.asarray(_convert_to_rgb(im))


def _rand(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


PNG = _encode(Image.fromarray(_rand(13, 21)), "PNG")


# ------------------------------------------------------------------------------------------ formats, modes
@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True}),
                                    ("GIF", {}), ("BMP", {}), ("TIFF", {})])
def test_formats_match_pillow_decode(fmt, kw):
    src = Image.fromarray(_rand(19, 23, seed=1))
    if fmt == "GIF":
        src = src.convert("P")
    data = _encode(src, fmt, **kw)
    got = load_image(data)
    want = _mc_rgb(Image.open(io.BytesIO(data)))
    assert got.dtype == np.uint8 and got.shape == (19, 23, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "RGB"])
def test_modes_match_mistral_common(mode):
    rgba = _rand(11, 9, 4, seed=2)
    rgba[0, 0, 3] = 0  # a fully transparent pixel must become white
    im = Image.fromarray(rgba, "RGBA")
    im = im.convert(mode) if mode != "RGBA" else im
    data = _encode(im, "TIFF" if mode == "CMYK" else "PNG")
    got = load_image(data)
    np.testing.assert_array_equal(got, _mc_rgb(Image.open(io.BytesIO(data))))
    if mode in ("RGBA", "LA"):
        assert (got[0, 0] == 255).all()


def test_palette_with_transparency_onto_white():
    p = Image.new("P", (4, 3), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    data = _encode(p, "PNG", transparency=0)
    got = load_image(data)
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (255, 0, 0)
    np.testing.assert_array_equal(got, _mc_rgb(Image.open(io.BytesIO(data))))


def test_16bit_scaled_not_saturated():
    a = (np.arange(6 * 7, dtype=np.uint32).reshape(6, 7) * 1500).astype(np.uint16)
    data = _encode(Image.fromarray(a), "PNG")
    got = load_image(data)
    want = ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(want[:, :, None], 3, axis=2))


# ------------------------------------------------------------------------------------------ EXIF
_INVERSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
            7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_upright(orientation):
    upright = _rand(4, 6, seed=3)                      # (h, w) = (4, 6): landscape, all pixels distinct
    stored = Image.fromarray(upright)
    if _INVERSE[orientation] is not None:
        stored = stored.transpose(_INVERSE[orientation])  # what a camera would have written
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "PNG", exif=exif)
    opened = open_image(data)
    assert opened.size == (6, 4)                       # size after rotation known before decoding
    np.testing.assert_array_equal(opened.decode(), upright)
    off = load_image(data, ImageLimits(apply_exif_orientation=False))
    np.testing.assert_array_equal(off, np.asarray(stored))


def test_exif_orientation_jpeg_size():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(_rand(40, 64)), "JPEG", exif=exif)
    assert load_image(data).shape == (64, 40, 3)


# ------------------------------------------------------------------------------------------ sources
def test_path_pathlike_file_url_bytes_pil(tmp_path):
    p = tmp_path / "a b.png"
    p.write_bytes(PNG)
    want = load_image(PNG)
    for src in (str(p), p, "file://" + str(p).replace(" ", "%20"), bytearray(PNG), memoryview(PNG),
                Image.open(io.BytesIO(PNG))):
        np.testing.assert_array_equal(load_image(src), want)


def test_data_url():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    np.testing.assert_array_equal(load_image(url), load_image(PNG))
    # line-wrapped payload and missing padding are tolerated
    b64 = base64.b64encode(PNG).decode().rstrip("=")
    wrapped = "data:image/png;base64," + "\n".join(b64[i:i + 60] for i in range(0, len(b64), 60))
    np.testing.assert_array_equal(load_image(wrapped), load_image(PNG))


@pytest.mark.parametrize("case", ["hw", "hw1", "hw3", "hw4", "u16", "bool", "float"])
def test_numpy_arrays(case):
    rgb = _rand(5, 7, seed=4)
    if case == "hw":
        a, want = rgb[:, :, 0], np.repeat(rgb[:, :, :1], 3, 2)
    elif case == "hw1":
        a, want = rgb[:, :, :1], np.repeat(rgb[:, :, :1], 3, 2)
    elif case == "hw3":
        a, want = rgb[:, ::-1], rgb[:, ::-1]   # non-contiguous view
    elif case == "hw4":
        a = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], 2)
        want = rgb
    elif case == "u16":
        a, want = rgb.astype(np.uint16) * 257, rgb
    elif case == "bool":
        a, want = rgb[:, :, 0] > 128, np.repeat(((rgb[:, :, :1] > 128) * 255).astype(np.uint8), 3, 2)
    else:
        a, want = rgb.astype(np.float32) / 255, rgb
    got = load_image(a)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_animated_gif_first_frame_or_refused():
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)).convert("P") for v in (10, 200, 90)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=50)
    with pytest.warns(AnimatedImageWarning, match="animated GIF with 3 frames"):
        got = load_image(b.getvalue())
    np.testing.assert_array_equal(got, _mc_rgb(frames[0]))
    with pytest.raises(AnimatedImageError, match=r"<\d+ bytes> is an animated GIF"):
        load_image(b.getvalue(), ImageLimits(allow_animated=False))


def test_animated_warning_can_be_routed_as_one_clean_line_per_load(caplog):
    """The server logs the warning once per request (every load), at warning level, as the message alone:
    no 'file:line: AnimatedImageWarning:' prefix and no source line."""
    import logging
    import warnings

    from pixtral_rt.errors import route_image_warnings
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)).convert("P") for v in (10, 200, 90)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=50)
    log = logging.getLogger("pixtral_rt.test_images")
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger=log.name):
        route_image_warnings(log.warning)
        for _ in range(2):  # two requests with the same image: two lines, not one per process
            load_image(b.getvalue())
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == log.name]
    want = f"image <{len(b.getvalue())} bytes> is an animated GIF with 3 frames: using the first frame only"
    assert lines == [(logging.WARNING, want)] * 2


# ------------------------------------------------------------------------------------------ bad inputs
def _truncated_png():
    return _encode(Image.fromarray(_rand(64, 64, seed=5)), "PNG")[:400]


def _bomb_png(w=100_000, h=100_000):
    """A valid 1x1 PNG whose IHDR claims w x h: the cap must fire from the header alone."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("src,exc,pattern", [
    (b"", ImageDecodeError, r"<0 bytes> is empty"),
    (bytes(range(256)) * 4, ImageDecodeError, r"<1024 bytes> is not a recognised image format"),
    (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", ImageDecodeError, r"HTML page"),
    (PNG[:60], ImageDecodeError, r"<60 bytes>.*(corrupt|truncated)"),
    ("ftp://example.com/cat.png", ImageSourceError, r"'ftp://example.com/cat.png' has unsupported scheme 'ftp'"),
    ("s3://bucket/cat.png", ImageSourceError, r"unsupported scheme 's3'"),
    ("gopher:cat.png", ImageSourceError, r"unsupported scheme 'gopher'"),
    (base64.b64encode(PNG).decode(), ImageSourceError, r"raw base64 without the data-URL prefix"),
    ("data:image/png;base64,@@@not-base64@@@", ImageSourceError, r"data URL 'data:image/png;base64,@@@.*not valid base64"),
    ("data:image/png," + "A" * 12, ImageSourceError, r"not base64-encoded"),
    ("data:text/html;base64," + base64.b64encode(b"<html>").decode(), ImageSourceError, r"not an image/\* type"),
    ("data:image/jpeg;base64," + base64.b64encode(PNG).decode(), ImageSourceError, r"declares image/jpeg but its bytes are PNG"),
    ("data:image/png;base64,", ImageDecodeError, r"empty payload"),
    ("data:image/png;base64" + "A" * 8, ImageSourceError, r"no ','"),
    ("/no/such/dir/cat.png", ImageSourceError, r"'/no/such/dir/cat.png' does not exist"),
    (12345, ImageSourceError, r"unsupported image source type int"),
    (np.zeros((4, 4, 2), np.uint8), ImageSourceError, r"shape=\(4, 4, 2\)"),
    (np.zeros((4, 4, 3), np.int32), ImageSourceError, r"dtype int32 not supported"),
    (np.full((4, 4), 2.0, np.float32), ImageSourceError, r"finite values in \[0, 1\]"),
    (np.zeros((0, 4, 3), np.uint8), ImageDecodeError, r"empty"),
    (_bomb_png(), ImageTooLargeError, r"(decompression bomb|over the cap)"),
    (_bomb_png(9000, 9000), ImageTooLargeError, r"9000x9000 = 81000000 pixels, over the cap"),
])
def test_bad_inputs(src, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        load_image(src)
    assert isinstance(info.value, PixtralInputError) and isinstance(info.value, ValueError)



def test_one_pixel_cap_one_message():
    """Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS (178956970) inside Image.open, with its own
    message and number; every image over ImageLimits.max_pixels must get ours instead: 20000x20000 (400M
    pixels, over Pillow's limit) and 9000x9000 (81M, between the two caps) read the same."""
    msgs = {}
    for side in (20000, 9000):
        with pytest.raises(ImageTooLargeError) as info:
            open_image(_bomb_png(side, side))
        msgs[side] = str(info.value)
        assert "178956970" not in msgs[side] and "89478485" not in msgs[side], msgs[side]
    wording = "image <67 bytes> is {0}x{0} = {1} pixels, over the cap of 67108864 (decompression-bomb guard)"
    for side, msg in msgs.items():
        assert msg.startswith(wording.format(side, side * side)), msg
    assert msgs[20000].replace("20000x20000 = 400000000", "N") == msgs[9000].replace("9000x9000 = 81000000", "N")


def test_pixel_cap_above_pillows_limit_is_the_one_that_counts():
    opened = open_image(_bomb_png(20000, 20000), ImageLimits(max_pixels=500_000_000))  # header only
    assert opened.size == (20000, 20000)
    with pytest.raises(ImageTooLargeError, match=r"30000x30000 = 900000000 pixels, over the cap of 500000000"):
        open_image(_bomb_png(30000, 30000), ImageLimits(max_pixels=500_000_000))

def test_truncated_and_corrupt_body_fail_at_decode_naming_the_file(tmp_path):
    p = tmp_path / "cut.png"
    p.write_bytes(_truncated_png())
    opened = open_image(str(p))                        # header is fine
    with pytest.raises(ImageDecodeError, match=r"cut.png.*(corrupt|truncated)"):
        opened.decode()
    jpg = bytearray(_encode(Image.fromarray(_rand(64, 64)), "JPEG"))
    jpg = bytes(jpg[:len(jpg) // 2])
    with pytest.raises(ImageDecodeError, match=r"\(JPEG\) is corrupt or truncated"):
        load_image(jpg)


def test_html_saved_as_png_and_empty_file_and_directory(tmp_path):
    p = tmp_path / "photo.png"
    p.write_text("<!doctype html>\n<html><head><title>Error</title></head></html>")
    with pytest.raises(ImageDecodeError, match=r"photo.png' is not a recognised image format \(it is an HTML page"):
        load_image(str(p))
    e = tmp_path / "empty.jpg"
    e.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty.jpg' is empty"):
        load_image(e)
    with pytest.raises(ImageSourceError, match="is a directory"):
        load_image(tmp_path)


def test_limits_pixels_bytes_local_files(tmp_path):
    with pytest.raises(ImageTooLargeError, match=r"13 = 273 pixels, over the cap of 100"):
        load_image(PNG, ImageLimits(max_pixels=100))
    with pytest.raises(ImageTooLargeError, match=r"bytes, over the cap of 10"):
        load_image(PNG, ImageLimits(max_bytes=10))
    with pytest.raises(ImageTooLargeError, match=r"over the cap of 10"):
        load_image(np.zeros((4, 4, 3), np.uint8), ImageLimits(max_pixels=10))
    p = tmp_path / "x.png"
    p.write_bytes(PNG)
    with pytest.raises(ImageSourceError, match="local files are not allowed"):
        load_image(str(p), ImageLimits(allow_local_files=False))


# ------------------------------------------------------------------------------------------ http(s)
class _Handler(http.server.BaseHTTPRequestHandler):
    user_agents: list = []

    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, code, body=b"", ctype="image/png", extra=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout tests)
            pass

    def do_GET(self):  # noqa: N802 - http.server API
        _Handler.user_agents.append(self.headers.get("User-Agent"))
        path = self.path
        if path == "/ok.png":
            self._send(200, PNG)
        elif path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            self._send(302, extra=[("Location", f"/redirect/{n - 1}" if n > 1 else "/ok.png")])
        elif path == "/to-ftp":
            self._send(302, extra=[("Location", "ftp://127.0.0.1/x.png")])
        elif path == "/stall":
            time.sleep(3.0)  # bounded: the server thread always finishes
            self._send(200, PNG)
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            for i in range(12):  # 0.3 s per byte: each read is quick, the whole download is not
                try:
                    self.wfile.write(PNG[i:i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.3)
        elif path == "/big":
            self._send(200, PNG * 10)
        elif path == "/big-no-length":
            self.send_response(200)
            self.end_headers()
            try:
                self.wfile.write(PNG * 10)
            except OSError:
                pass
        elif path == "/page.png":
            self._send(200, b"<html><body>login required</body></html>", ctype="text/html")
        else:
            self._send(404, b"not found", ctype="text/plain")


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


FAST = ImageLimits(timeout=0.5, max_redirects=3)


def test_url_ok_user_agent_and_redirects(server):
    _Handler.user_agents.clear()
    np.testing.assert_array_equal(load_image(server + "/ok.png", FAST), load_image(PNG))
    assert _Handler.user_agents and _Handler.user_agents[-1].startswith("pixtral_rt/")
    np.testing.assert_array_equal(load_image(server + "/redirect/3", FAST), load_image(PNG))
    with pytest.raises(ImageFetchError, match=r"/redirect/4'.*more than 3 redirects"):
        load_image(server + "/redirect/4", FAST)
    with pytest.raises(ImageFetchError, match="non-http"):
        load_image(server + "/to-ftp", FAST)


def test_url_errors(server):
    with pytest.raises(ImageFetchError, match=r"/missing.png'.*HTTP 404"):
        load_image(server + "/missing.png", FAST)
    with pytest.raises(ImageTooLargeError, match=r"/big'.*Content-Length.*over the cap"):
        load_image(server + "/big", ImageLimits(timeout=2, max_bytes=len(PNG) * 2))
    with pytest.raises(ImageTooLargeError, match=r"/big-no-length'.*over the cap"):
        fetch_url(server + "/big-no-length", ImageLimits(timeout=2, max_bytes=len(PNG) * 2))
    with pytest.raises(ImageDecodeError, match=r"/page.png'.*HTML page"):
        load_image(server + "/page.png", FAST)
    with pytest.raises(ImageFetchError, match="unreachable|connection"):
        load_image("http://127.0.0.1:9/x.png", FAST)  # discard port: nothing listens


@pytest.mark.parametrize("route", ["/stall", "/drip"])
def test_url_stall_is_bounded_by_timeout(server, route):
    t0 = time.monotonic()
    with pytest.raises(ImageFetchError, match=rf"{route}'.*(timed out|within 0.5 s|not finished)"):
        load_image(server + route, FAST)
    assert time.monotonic() - t0 < 2.0


def test_error_family():
    for cls in (ImageDecodeError, ImageSourceError, ImageFetchError, ImageTooLargeError, AnimatedImageError):
        assert issubclass(cls, ImageError) and issubclass(cls, ValueError)
