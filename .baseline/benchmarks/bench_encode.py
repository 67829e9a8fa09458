"""Host side of a request: chat.encode_request (open + decode + preprocess every image, tokenise) with the
images on threads vs one by one, in one run, on this machine's CPU.

Cases: the 4-image set of performance.md (1024^2, 512x768, 768x512, 256^2) and the 2-image odd-size request
(37x1500 + 640x480), as JPEG bytes (what a client uploads). raw_pixels=True (the GPU engines resize and
normalise on the GPU) and False (host preprocessing). Floor: the slowest single image's encode alone (the
threads cannot finish before it does).

    python -m benchmarks.bench_encode
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from benchmarks.common import median_wall_ms, record
from pixtral_rt.chat import encode_request, load_tokenizer
from pixtral_rt.config import PIXTRAL_12B

SETS = {"4imgs_mixed": [(1024, 1024), (512, 768), (768, 512), (256, 256)], "2imgs_odd": [(37, 1500), (640, 480)]}


def jpeg(h, w, rng) -> bytes:
    # smooth content (not noise): JPEG sizes and decode times like a photo's
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) % 256)], -1).astype(np.uint8)
    a = np.clip(a.astype(int) + rng.integers(-8, 8, a.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main():
    tok = load_tokenizer(None, PIXTRAL_12B)
    rng = np.random.default_rng(0)
    for name, sizes in SETS.items():
        imgs = [jpeg(h, w, rng) for h, w in sizes]

        def msgs(srcs):
            return [{"role": "user", "content": [{"type": "image", "image": s} for s in srcs]
                     + [{"type": "text", "text": "describe the pictures in detail please " * 5}]}]

        for raw in (True, False):
            run = lambda workers, srcs=imgs: encode_request(msgs(srcs), tok, PIXTRAL_12B, raw_pixels=raw,  # noqa
                                                            workers=workers)
            serial = median_wall_ms(lambda: run(1))
            par = median_wall_ms(lambda: run(None))          # the default: threads when worth it
            floor = max(median_wall_ms(lambda s=s: run(1, [s])) for s in imgs)
            record("encode", f"{name} raw_pixels={raw}", "encode_ms", par, "ms", "same request, images one by one",
                   serial, floor, cpus=os.cpu_count(), speedup=round(serial / par, 2))


if __name__ == "__main__":
    main()
