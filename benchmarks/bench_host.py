"""Host work of one request before the GPU starts (issue 12), on this machine's CPU, median wall clock:
  tokenise      chat.encode_request's tokenisation of a 1024x1024-image prompt (4193 tokens), as it runs now;
                baseline: the same plus the work it skips, mistral_common decoding every token back to text
                (InstructTokenizer.decode with special tokens kept, what encode_instruct did for its text field)
  digest        serving.sequence.image_digest (SHA-256 over the pixels, no copy, in slices on threads) of a
                decoded 1024^2 image; baselines: SHA-256 over the pixels on one thread (the digest until
                2026-12-07) and the first digest, BLAKE2b-128 over header + a.tobytes()
  repeat_url    chat.encode_request (the server's path: raw pixels + digest) of a chat whose image is a ~4 MB
                PNG data URL sent again (turn 2: pixtral_rt/image_cache.py serves it); baseline: the same
                request with the cache emptied before each call (base64 + PNG decode + digest every time)
  detokenize    serving.detokenize.TextStream over a 2000-token answer, one token at a time as the server
                streams it, per token (tekken: ByteText, the incremental UTF-8 decode of per-token bytes);
                baseline: the same stream on IncrementalText (two window decodes through mistral_common a token)

    python -m benchmarks.bench_host
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from benchmarks.common import median_wall_ms, photo_like_jpeg, record


def _one_thread_digest(a: np.ndarray) -> bytes:
    h = hashlib.sha256(repr((a.shape, a.dtype.str)).encode())
    h.update(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
    return h.digest()


def _old_digest(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    return hashlib.blake2b(repr((a.shape, a.dtype.str)).encode() + a.tobytes(), digest_size=16).digest()


def main() -> None:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    from pixtral_rt.chat import _parse_messages, _tokenize, encode_request, load_tokenizer
    from pixtral_rt.config import PIXTRAL_12B
    from pixtral_rt.images import open_image
    from pixtral_rt.preprocess import plan_image
    from pixtral_rt.serving.sequence import image_digest
    tok = load_tokenizer(None, PIXTRAL_12B)
    jpg = photo_like_jpeg(1024, 1024, np.random.default_rng(0))
    msgs = [{"role": "user", "content": [{"type": "image", "image": jpg},
                                         {"type": "text", "text": " ".join(["describe the picture"] * 8)}]}]
    parsed, images = _parse_messages(msgs)
    for im in images:
        im.opened = open_image(im.source)
        im.plan = plan_image(im.opened.width, im.opened.height, PIXTRAL_12B.vision)
    tokens = encode_request(msgs, tok, PIXTRAL_12B, raw_pixels=True).tokens
    now = median_wall_ms(lambda: _tokenize(tok, parsed, images), reps=21)
    skipped = median_wall_ms(lambda: tok.instruct_tokenizer.decode(tokens, special_token_policy=SpecialTokenPolicy.KEEP),
                             reps=21)
    record("host", "tokenise_1img_1024", "tokenise_ms", now, "ms", "tokenise_plus_text_decode", now + skipped, None,
           prompt_tokens=len(tokens), skipped_text_decode_ms=round(skipped, 3))
    px = encode_request(msgs, tok, PIXTRAL_12B, raw_pixels=True).images[0]
    assert image_digest(px) != _old_digest(px)
    new = median_wall_ms(lambda: image_digest(px), reps=21)
    one = median_wall_ms(lambda: _one_thread_digest(px), reps=21)
    old = median_wall_ms(lambda: _old_digest(px), reps=21)
    record("host", "digest_1024sq_uint8", "image_digest_ms", new, "ms", "sha256_one_thread", one, None,
           bytes=int(px.nbytes), blake2b_over_copy_ms=round(old, 3), cpus=os.cpu_count())
    _repeat_url(tok, PIXTRAL_12B, image_digest)
    _detokenize(tok)


def _detokenize(tok) -> None:
    from pixtral_rt.serving.detokenize import ByteText, IncrementalText, TextStream
    raw = tok.instruct_tokenizer.tokenizer
    ids = raw.encode("The quick brown fox jumps over the lazy dog. 東京タワー and café, naïve. " * 60,
                     bos=False, eos=False)[:2000]

    def run(windowed: bool):
        ts = TextStream(tok)
        if windowed:
            ts._inc = IncrementalText(tok.decode)
        assert windowed or isinstance(ts._inc, ByteText)
        for i in ids:
            ts.add([i])
        return ts.text + ts.finish()
    assert run(False) == run(True) == tok.decode(ids)
    new = median_wall_ms(lambda: run(False), reps=7) * 1e3 / len(ids)
    old = median_wall_ms(lambda: run(True), reps=7) * 1e3 / len(ids)
    record("host", "detokenize_stream_2000_tokens", "per_token_us", new, "us", "IncrementalText (window decode)",
           old, None, tokens=len(ids))


def _repeat_url(tok, args, image_digest) -> None:
    import base64
    import io

    from PIL import Image

    from pixtral_rt import image_cache
    from pixtral_rt.chat import encode_request
    rng = np.random.default_rng(1)
    # a photo-like picture stored as PNG: ~4 MB encoded at 1400 x 1400
    a = np.asarray(Image.open(io.BytesIO(photo_like_jpeg(1400, 1400, rng))).convert("RGB"))
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this picture?"}]}]

    def encode():
        return encode_request(msgs, tok, args, raw_pixels=True, digest=image_digest)

    def uncached():
        image_cache.CACHE.clear()
        return encode()

    assert encode().image_digests == uncached().image_digests        # same request either way
    cold = median_wall_ms(uncached, reps=9)
    encode()
    warm = median_wall_ms(encode, reps=9)
    record("host", "repeat_png_data_url", "encode_request_ms", warm, "ms", "image_cache_emptied", cold, None,
           url_MB=round(len(url) / 2**20, 2), png_MB=round(len(b.getvalue()) / 2**20, 2), pixels=f"{a.shape[1]}x{a.shape[0]}")


if __name__ == "__main__":
    main()
