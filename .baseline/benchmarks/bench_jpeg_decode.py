"""JPEG decoding on the GPU (nvJPEG through torchvision.io.decode_jpeg(device="cuda")) against Pillow, the
decoder mistral_common uses (issue 12: decode on the GPU where it is faster, with preprocessing identical to
mistral_common). For each file: Pillow decode ms (CPU, what pixtral_rt.images does), nvJPEG ms (file bytes
already in memory, result synchronised on the GPU, upload included), and how many pixels differ and by how
much. Files: smooth random content saved by Pillow at quality 90 (4:2:0, the default) and quality 95 4:4:4.

    python -m benchmarks.bench_jpeg_decode
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from benchmarks.common import median_wall_ms, photo_like_jpeg, record

SIZES = [(480, 640), (1024, 1024), (3000, 4000)]   # (height, width)


def main() -> None:
    import torch
    from torchvision.io import decode_jpeg
    for h, w in SIZES:
        for quality, sub in ((90, 2), (95, 0)):
            data = photo_like_jpeg(h, w, np.random.default_rng(h + w), quality, sub)
            pil = lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # noqa: E731
            ref = pil()
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)

            def gpu():
                out = decode_jpeg(raw, device="cuda")
                torch.cuda.synchronize()
                return out
            got = gpu().permute(1, 2, 0).cpu().numpy()
            diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
            t_pil, t_gpu = median_wall_ms(pil, reps=7), median_wall_ms(gpu, reps=7)
            case = f"{w}x{h}_q{quality}_{'420' if sub == 2 else '444'}"
            record("jpeg_decode", case, "nvjpeg_ms", t_gpu, "ms", "pillow_decode", t_pil, None,
                   bytes=len(data), pixels_differing_frac=round(float((diff > 0).mean()), 5),
                   max_abs_diff=int(diff.max()), mean_abs_diff=round(float(diff.mean()), 4))


if __name__ == "__main__":
    main()
